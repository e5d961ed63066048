"""Tokenizers that come with Hugging Face checkpoints, behind llmjax's `Tokenizer` interface.

llmjax's own SentencePiece models have fixed special ids (see `tokenizer.py`). Imported
checkpoints bring their own: a SentencePiece `.model` with another layout (LLaMA: <unk>=0
<s>=1 </s>=2; T5: <pad>=0 </s>=1 <unk>=2) or a `tokenizer.json` of the `tokenizers`
package (GPT-2 byte-level BPE, BERT WordPiece). Both classes here expose what generation,
packing and the objectives use: `encode(text, add_bos, add_eos)`, `encode_batch`,
`decode`, `decode_batch`, `vocab_size`, `pad_id`/`eos_id`/`bos_id`/`unk_id`,
`id_to_piece`, `piece_to_id`, `serialized()`. `Tokenizer.from_bytes` picks the class.
"""

import json
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from llmjax.errors import UserError

# Special tokens by convention, first match wins (tokenizer.json does not say which is EOS).
_EOS = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>", "[CLS]")
_PAD = ("<pad>", "[PAD]", "<|pad|>")
_UNK = ("<unk>", "[UNK]", "<|unk|>")


class _Common:
  """Batch helpers and the sentinel API (imported vocabularies have no llmjax sentinels)."""

  num_sentinels = 0
  mask_id = None

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                   add_eos: bool = False, num_threads: int = -1) -> list[list[int]]:
    del num_threads
    return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in batch]

  def sentinel_id(self, i: int) -> int:
    raise ValueError(f"sentinel {i} out of range: this imported tokenizer has no llmjax "
                     "sentinels")

  def serialized(self) -> bytes:
    return self._bytes

  def __eq__(self, other):
    return type(self) is type(other) and self._bytes == other._bytes

  def __hash__(self):
    return hash(self._bytes)

  def __reduce__(self):
    return (type(self), (self._bytes,))


class SentencePieceTokenizer(_Common):
  """A SentencePiece model with its own special ids (LLaMA, T5)."""

  def __init__(self, model_bytes: bytes):
    self._bytes = bytes(model_bytes)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._bytes)
    except Exception as e:  # sentencepiece raises assorted types
      raise UserError(f"not a SentencePiece model ({e}); pass a valid .model file") from e
    sp = self._sp
    self.unk_id = sp.unk_id()
    self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    # No pad piece (LLaMA): pad with EOS; padded positions are masked out anyway.
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else (self.eos_id or 0)

  vocab_size = property(lambda self: self._sp.get_piece_size())

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = self._sp.encode(text)
    return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids + (
        [self.eos_id] if add_eos and self.eos_id is not None else [])

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def __repr__(self):
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class JsonTokenizer(_Common):
  """A `tokenizer.json` (Hugging Face `tokenizers`): GPT-2 BPE, BERT WordPiece, ..."""

  def __init__(self, json_bytes: bytes):
    try:
      from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
      raise UserError("this run's tokenizer is a tokenizer.json, which needs the "
                      "`tokenizers` package; pip install 'llmjax[hf]'.") from e
    self._bytes = bytes(json_bytes)
    try:
      self._tok = HFTokenizer.from_str(self._bytes.decode("utf-8"))
    except Exception as e:  # tokenizers raises plain Exceptions
      raise UserError(f"not a valid tokenizer.json ({e}); pass the file that "
                      "`tokenizer.save_pretrained` wrote.") from e
    vocab = self._tok.get_vocab(with_added_tokens=True)
    find = lambda names: next((vocab[n] for n in names if n in vocab), None)
    self.eos_id, self.bos_id, self.unk_id = find(_EOS), find(_BOS), find(_UNK)
    pad = find(_PAD)
    self.pad_id = pad if pad is not None else (self.eos_id or 0)

  vocab_size = property(lambda self: self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    # Specials are added here, not by the post-processor, so every caller controls them.
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids + (
        [self.eos_id] if add_eos and self.eos_id is not None else [])

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def piece_to_id(self, piece: str) -> int:
    found = self._tok.token_to_id(piece)
    return self.unk_id if found is None else found

  def __repr__(self):
    return f"JsonTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def is_tokenizer_json(data: bytes) -> bool:
  """Whether `data` looks like a tokenizer.json (a JSON object) rather than a protobuf."""
  head = data.lstrip()[:1]
  if head != b"{":
    return False
  try:
    return isinstance(json.loads(data.decode("utf-8")), dict)
  except (UnicodeDecodeError, ValueError):
    return False
