"""Translation with an encoder-decoder: English number words -> French, scored by BLEU.

Command (from the repository root, after `bash scripts/setup_env.sh`):
  .venv/bin/python experiments/translation_num2words.py --workdir /tmp/n2w \
      --data_dir /tmp/tfds

Trains `gin_configs/runs/translate_num2words.gin` (t5-tiny at width 128, 2 + 2 layers,
sinusoidal positions with sqrt(D)-scaled token embeddings, teacher-forced seq2seq on
`num2words_translate/en-fr`: the integers 0..9999, 90/5/5 hash splits, so validation
numbers are unseen combinations of seen parts; a 200-piece BPE shared by both languages,
which ends up whole-word) through the ordinary `llmjax train` loop, then greedy-decodes
every validation source with the KV-cached generator (`llmjax.decode.generate` through
`llmjax.eval.bleu.greedy_decode_cached`; `--decoder full` for the full-forward loop) and
scores the outputs with sacrebleu.

Result (2-core AMD EPYC CPU shared with ~4 other jobs, load average ~8, no accelerator;
400 steps of 32 rows x 32 tokens, ~4 pairs per row; 247 s of training including 18 s
of compilation, 13 s to decode all 494 validation pairs):
  eval loss 0.011 (token accuracy 99.92%) at step 400
  BLEU 99.99  chrF 99.99  on all 494 validation pairs (greedy); 493 exactly right
  'ninety-two' -> 'quatre-vingt-douze', 'fifty-one' -> 'cinquante et un' (correct)
  'zero' -> 'onze' (reference 'zéro'): the only failure; 0 is a validation number and
  'zéro' appears nowhere in the training split, so no model could produce it.

Why an earlier version reached only BLEU 8.6 after 800 steps (1,099 s): its token
embeddings (std 0.02, norm ~0.2) were added to sinusoidal positions of norm ~8, so the
encoder barely saw which word it read; training sat on a target-side language-model
plateau (loss ~1.1, train = eval) for hundreds of steps. Scaling the embeddings by
sqrt(D), as Vaswani et al. do (`get_preset.scale_embeddings = True`), drops the eval
loss to 0.05 by step 100. `position='t5_relative'` instead works as well (BLEU 99.92
after 300 steps); packing, masks, tokenization and the decoder were correct.
"""

import argparse
import time

import gin

from llmjax.eval import bleu
from llmjax.train import main


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--workdir", required=True, help="run folder (resumes if it exists)")
  p.add_argument("--data_dir", default=None, help="TFDS folder for the built dataset")
  p.add_argument("--gin_param", action="append", default=[], help="extra bindings")
  p.add_argument("--max_examples", type=int, default=None,
                 help="score only the first N validation pairs (default: all)")
  p.add_argument("--decoder", default="cached", choices=("cached", "full"),
                 help="greedy decoder: the KV-cached generator or the full-forward loop")
  return p.parse_args()


def main_(args):
  params = list(args.gin_param) + ["TrainConfig.progress_bar = False"]
  if args.data_dir:
    params.append(f"DataConfig.data_dir = {args.data_dir!r}")
  start = time.time()
  result = main.run(["runs/translate_num2words.gin"], params, args.workdir)
  train_s = time.time() - start
  data = gin.query_parameter("train.data").scoped_configurable_fn()
  lengths = data.lengths()
  start = time.time()
  scores = bleu.evaluate_translation(
      result.model, result.state.params, result.tokenizer, result.objective, data.dataset,
      split="validation", data_dir=data.data_dir, inputs_length=lengths["inputs"],
      max_len=lengths["targets"], max_examples=args.max_examples, decoder=args.decoder)
  print(f"trained {result.config.num_steps} steps in {train_s:.0f}s; greedy-decoded "
        f"{scores['num_examples']} validation pairs in {time.time() - start:.0f}s")
  print(f"BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}")
  triples = list(zip(scores["sources"], scores["references"], scores["hypotheses"]))
  wrong = [t for t in triples if t[1] != t[2]]
  print(f"{len(triples) - len(wrong)} of {len(triples)} translations exactly right")
  for source, reference, hypothesis in triples[:5] + wrong[:10]:
    print(f"  {source!r} -> {hypothesis!r} (reference {reference!r})")
  return scores


if __name__ == "__main__":
  main_(parse_args())
