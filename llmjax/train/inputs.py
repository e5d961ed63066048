"""The run's text side: which tokenizer, which data, built once per workdir.

The tokenizer is resolved in this order: the copy inside the workdir (a resumed run keeps
the tokenizer it started with), an explicit `.model` path, or a new SentencePiece model
trained on the training split of the run's dataset and saved into the workdir.
"""

import dataclasses
import os
import shutil
import time

from llmjax.errors import UserError

TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"  # written by `llmjax convert --from_hf` (GPT-2, BERT)


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """How a run gets its tokenizer (what gin binds as `TokenizerSpec.*`)."""

  path: str | None = None         # an existing SentencePiece .model; None = train one
  model_type: str = "bpe"         # bpe | unigram | char
  vocab_size: int | None = 4000  # None: the type's default (char: every character)
  num_sentinels: int | None = None
  character_coverage: float = 1.0
  byte_fallback: bool = False
  whitespace_exact: bool = True   # markdown and code keep their spaces and newlines
  max_train_docs: int | None = None


def resolve_tokenizer(spec: TokenizerSpec, workdir: str, dataset: str, data_dir=None,
                      text_key=None, log=print, input_dir=None):
  from llmjax.data import datasets
  from llmjax.data import tokenizer as tokenizer_lib

  local = os.path.join(workdir, TOKENIZER_FILE)
  for name in (TOKENIZER_FILE, HF_TOKENIZER_FILE):  # an imported checkpoint's own tokenizer
    if os.path.exists(os.path.join(workdir, name)):
      return tokenizer_lib.load_any(os.path.join(workdir, name))
  if spec.path:
    if not os.path.exists(spec.path):
      raise UserError(f"tokenizer file {spec.path} does not exist; fix TokenizerSpec.path or "
                      "set it to None to train one on the run's dataset.")
    # A tokenizer.json (an imported Hugging Face model's) keeps its own file name.
    target = os.path.join(workdir, HF_TOKENIZER_FILE if spec.path.endswith(".json")
                          else TOKENIZER_FILE)
    shutil.copyfile(spec.path, target + ".tmp")
    os.replace(target + ".tmp", target)
    return tokenizer_lib.load_any(target)
  start = time.time()
  source_kwargs = {"input_dir": input_dir} if input_dir else {}  # local_text's folder
  texts = datasets.iter_texts(dataset, "train", data_dir=data_dir, text_key=text_key,
                              **source_kwargs)
  if spec.max_train_docs:
    texts = (t for i, t in zip(range(spec.max_train_docs), texts))
  tok = tokenizer_lib.train_tokenizer(
      texts, os.path.join(workdir, "tokenizer"), model_type=spec.model_type,
      vocab_size=spec.vocab_size, num_sentinels=spec.num_sentinels,
      character_coverage=spec.character_coverage, byte_fallback=spec.byte_fallback,
      whitespace_exact=spec.whitespace_exact)
  log(f"trained a {spec.model_type} tokenizer with {tok.vocab_size} pieces on {dataset} "
      f"in {time.time() - start:.1f}s -> {local}")
  return tok
