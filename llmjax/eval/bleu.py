"""Translation quality: greedy decoding of an encoder-decoder, scored with sacrebleu.

BLEU (Papineni et al. 2002) and chrF (Popović 2015) come from `sacrebleu` (Post 2018,
"A Call for Clarity in Reporting BLEU Scores"), never hand-written, so the numbers are
comparable with published ones: `corpus_bleu` with its default 13a tokenization and
`corpus_chrf` with its defaults (character 6-grams, beta 2).

Two greedy decoders give the same tokens: `greedy_decode` is the plain one (the whole
decoder is re-run over a fixed-length buffer at each step; causal attention makes the
unfilled tail irrelevant; one jitted `fori_loop`, O(T^2) in the output length), and
`greedy_decode_cached` goes through `llmjax.decode.generate`'s KV cache (the encoder
output and its cross-attention keys/values are computed once; one step per token).
"""

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from llmjax.data import datasets
from llmjax.errors import UserError


def corpus_scores(hypotheses, references) -> dict[str, float]:
  """sacrebleu's corpus BLEU and chrF of `hypotheses` against one reference each."""
  hypotheses, references = list(hypotheses), list(references)
  if len(hypotheses) != len(references) or not hypotheses:
    raise UserError(f"need as many hypotheses as references (and at least one), got "
                    f"{len(hypotheses)} and {len(references)}")
  return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
          "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}


def _make_greedy(model, max_len: int, start_id: int, eos_id: int, pad_id: int):
  """A jitted `(params, inputs [B, S], inputs_seg [B, S]) -> outputs [B, max_len]`."""

  def run(params, inputs, inputs_seg):
    variables = {"params": params}
    encoded = model.apply(variables, inputs, inputs_seg, method="encode")  # [B, S, D]
    batch = inputs.shape[0]
    # One spare column so step i can always write its token at i + 1.
    decoder_in = jnp.full((batch, max_len + 1), pad_id, jnp.int32).at[:, 0].set(start_id)
    outputs = jnp.full((batch, max_len), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def step(i, carry):
      decoder_in, outputs, done = carry
      logits = model.apply(variables, decoder_in[:, :max_len], encoded=encoded,
                           encoder_segment_ids=inputs_seg, method="decode")  # [B, T, V]
      token = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)  # [B]
      token = jnp.where(done, pad_id, token)
      outputs = outputs.at[:, i].set(token)
      decoder_in = decoder_in.at[:, i + 1].set(token)
      return decoder_in, outputs, done | (token == eos_id)

    return jax.lax.fori_loop(0, max_len, step, (decoder_in, outputs, done))[1]

  return jax.jit(run)


def _pad_rows(rows, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows of ids -> (tokens [B, S], segment ids [B, S]: 1 on real tokens, 0 on padding)."""
  tokens = np.zeros((len(rows), length), np.int32)
  segment_ids = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    row = np.asarray(row, np.int32)[:length]
    tokens[i, :len(row)] = row
    segment_ids[i, :len(row)] = 1
  return tokens, segment_ids


def greedy_decode(model, params, inputs, *, inputs_length: int, max_len: int, start_id: int,
                  eos_id: int, pad_id: int = 0, batch_size: int = 64) -> list[list[int]]:
  """Greedy outputs (cut before eos) for each encoder id sequence in `inputs`.

  Inputs longer than `inputs_length` are truncated; batches are padded to
  `batch_size` rows so the loop compiles once.
  """
  run = _make_greedy(model, max_len, start_id, eos_id, pad_id)
  results = []
  for begin in range(0, len(inputs), batch_size):
    chunk = list(inputs[begin:begin + batch_size])
    rows = chunk + [[eos_id]] * (batch_size - len(chunk))  # dummy rows, dropped below
    tokens, seg = _pad_rows(rows, inputs_length)
    out = np.asarray(run(params, tokens, seg))[:len(chunk)]
    for row in out.tolist():
      results.append(row[:row.index(eos_id)] if eos_id in row else row)
  return results


def greedy_decode_cached(model, params, inputs, *, max_len: int, start_id: int, eos_id: int,
                         pad_id: int = 0, batch_size: int = 512) -> list[list[int]]:
  """`greedy_decode`'s outputs through the KV-cached generator (`llmjax.decode.generate`).

  Every batch but the last has `batch_size` rows; fewer, larger batches mean fewer
  compilations (the encoder length is each batch's longest input).
  """
  from llmjax.decode import generate as generate_lib  # pylint: disable=import-outside-toplevel
  from llmjax.decode.sampling import SamplingConfig  # pylint: disable=import-outside-toplevel

  results = []
  for begin in range(0, len(inputs), batch_size):
    chunk = [list(map(int, row)) for row in inputs[begin:begin + batch_size]]
    out = generate_lib.generate(model, params, None, max_new_tokens=max_len,
                                sampling=SamplingConfig(temperature=0.0), eos_id=eos_id,
                                pad_id=pad_id, encoder_inputs=chunk, decoder_start_id=start_id)
    for row in out.rows():
      results.append(row[:row.index(eos_id)] if eos_id in row else row)
  return results


def evaluate_translation(model, params, tokenizer, objective, dataset: str, *,
                         split: str = "validation", data_dir: str | None = None,
                         inputs_length: int = 64, max_len: int = 64,
                         max_examples: int | None = None, batch_size: int = 64,
                         decoder: str = "full") -> dict:
  """Greedy-translates `dataset[split]` and scores it: `{'bleu', 'chrf', 'num_examples',
  'sources', 'references', 'hypotheses'}` (one entry per example, in split order).

  `objective` is the `Seq2Seq` the model was trained with: it names the source and
  target fields and turns a source text into encoder ids (task prefix included).
  `decoder`: 'full' (`greedy_decode`) or 'cached' (`greedy_decode_cached`, faster).
  """
  if decoder not in ("full", "cached"):
    raise UserError(f"decoder={decoder!r}: use 'full' (re-run the decoder each step) or "
                    "'cached' (the KV-cached generator).")
  source = datasets.get_source(dataset, split, data_dir)
  count = len(source) if max_examples is None else min(max_examples, len(source))
  records = [source[i] for i in range(count)]
  sources = [r[objective.inputs_key] for r in records]
  references = [r[objective.targets_key] for r in records]
  ids = [objective.encode_inputs(text, tokenizer) for text in sources]
  ids = [row[:inputs_length] for row in ids]  # what either decoder reads
  kwargs = {"max_len": max_len, "start_id": objective.decoder_start_id,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
  if decoder == "cached":
    outputs = greedy_decode_cached(model, params, ids, **kwargs)
  else:
    outputs = greedy_decode(model, params, ids, inputs_length=inputs_length,
                            batch_size=batch_size, **kwargs)
  hypotheses = tokenizer.decode_batch(outputs)
  scores = corpus_scores(hypotheses, references)
  return {**scores, "num_examples": count, "sources": sources, "references": references,
          "hypotheses": hypotheses}

