"""DPO's reference log-probs in one pass over the data, from a reference workdir.

The reference of a DPO run never changes, so its per-pair log-probs can be computed once
and stored (`DPO.reference_table` -> `preference.write_table`); the run then reads them
(`DPO.precomputed_reference=PATH`) and holds no reference model, which halves the
parameter memory of a full fine-tune (trl#624; TRL's `precompute_ref_log_probs`). The
reference may be any decoder-only or encoder-decoder workdir (an SFT run, an imported
Hugging Face model, a LoRA run: its adapters are folded in) of the policy's arch that
shares its tokenizer; the rows follow its arch (`DPO`'s module docstring has both
layouts) and the table records it, so a run packing the other layout is refused:

  from llmjax.objectives.dpo import DPO
  from llmjax.train import dpo_reference
  dpo_reference.precompute("workdirs/sft", "workdirs/ref_logps.json", objective=DPO(
      max_len=128), dataset="shakespeare_preferences", policy="workdirs/sft")
  llmjax train --gin_file=runs/dpo.gin --gin_param="TrainConfig.init_from='workdirs/sft'" \
    --gin_param="DPO.precomputed_reference='workdirs/ref_logps.json'" --workdir=...
"""

import os

from llmjax.checkpoint import workdir as workdir_lib
from llmjax.data import datasets
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.objectives import preference
from llmjax.train import warm_start


def check_same_vocabulary(reference: str, ref_model, ref_tokenizer, policy: str) -> None:
  """A UserError unless the reference workdir's arch, tokenizer and vocabulary are the
  policy workdir's: log-probs of other token ids are log-probs of other sequences."""
  source = warm_start.load(policy)
  policy_vocab = source.model_config.vocab_size
  ref_vocab = getattr(getattr(ref_model, "config", None), "vocab_size", None)
  ref_arch = getattr(getattr(ref_model, "config", None), "arch", None)
  if ref_arch is not None and ref_arch != source.model_config.arch:
    raise UserError(f"the DPO reference {reference} is {ref_arch} but the policy {policy} is "
                    f"{source.model_config.arch}: DPO's reference is the policy's starting "
                    "model (use the policy's SFT checkpoint).")
  if ref_vocab is not None and ref_vocab != policy_vocab:
    raise UserError(f"the DPO reference {reference} has a vocabulary of {ref_vocab} but the "
                    f"policy {policy} of {policy_vocab}: the reference must share the "
                    "policy's tokenizer and vocabulary (use the policy's SFT checkpoint).")
  if source.tokenizer_path is None:
    return
  policy_tok = tokenizer_lib.load_any(source.tokenizer_path)
  if preference.tokenizer_fingerprint(policy_tok) != preference.tokenizer_fingerprint(
      ref_tokenizer):
    raise UserError(f"the DPO reference {reference} has another tokenizer than the policy "
                    f"{policy} ({ref_tokenizer.vocab_size} vs {policy_tok.vocab_size} "
                    "pieces): the reference must share the policy's tokenizer (use the "
                    "policy's SFT checkpoint as the reference).")


def _records(dataset, split, data_dir, input_dir):
  kwargs = {"input_dir": input_dir} if input_dir else {}
  source = datasets.get_source(dataset, split, data_dir, **kwargs)
  return [source[i] for i in range(len(source))]


def precompute(reference: str, out: str, *, objective, dataset: str,
               splits=("train", "validation"), data_dir: str | None = None,
               input_dir: str | None = None, policy: str | None = None,
               batch_size: int = 8, log=print) -> str:
  """Writes the reference log-probs of every pair of `dataset`'s `splits` under the
  latest checkpoint of `reference` to `out` (JSON); returns `out`. `policy`: the DPO
  run's `init_from` workdir, whose tokenizer and vocabulary the reference must share."""
  model, params, tok = workdir_lib.load_workdir(reference)
  arch = getattr(getattr(model, "config", None), "arch", None)
  if arch == "encoder_only":
    raise UserError(f"the DPO reference {reference} is encoder_only, which gives no "
                    "log-probs of a response: use a decoder-only or encoder-decoder workdir.")
  if policy:
    check_same_vocabulary(reference, model, tok, policy)
  table = {}
  for split in splits:
    records = _records(dataset, split, data_dir, input_dir)
    table.update(objective.reference_table(model, params, records, tok, batch_size))
    log(f"reference log-probs: {len(records)} pairs of {dataset}/{split}")
  meta = {"reference": os.path.abspath(reference), "max_len": objective.max_len, "arch": arch,
          "tokenizer": preference.tokenizer_fingerprint(tok), "dataset": dataset,
          "splits": list(splits)}
  return preference.write_table(out, table, meta)
