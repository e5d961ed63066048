"""SentencePiece tokenizers: train (bpe, unigram, char), load, encode and decode.

SentencePiece: Kudo & Richardson 2018, https://arxiv.org/abs/1808.06226 (BPE: Sennrich et
al. 2016; unigram LM: Kudo 2018). Every model trained here has the same special-token
layout, checked after training and again on load:

  0 <pad>  1 </s> (EOS)  2 <s> (BOS)  3 <unk>  4 <mask>  5.. <extra_id_0>..<extra_id_{N-1}>

`<mask>` and the sentinels are user-defined pieces (an occurrence in raw text encodes to
the id, and decode prints the piece); pad/eos/bos are control pieces (decode drops them).

Whitespace-exact mode (for markdown and code, where `"  \\n"` is a line break and
indentation is syntax) makes `decode(encode(text)) == text` for any text made of
characters the model covers, and for any text at all with `byte_fallback=True`. How:
  * `identity` (or `nfkc`) normalization, `remove_extra_whitespaces=False` and
    `add_dummy_prefix=False`, so no space is added, dropped or merged;
    `allow_whitespace_only_pieces=True` so runs of spaces become pieces ("▁▁").
  * SentencePiece reads its corpus as lines, so a newline is a user-defined piece
    `"\\n"` (id right after the sentinels): it is always its own token and never
    needs to be seen in training. The corpus is fed one line per sentence (newlines
    removed; lines longer than `_MAX_LINE_CHARS` are cut), and `encode` takes whole
    documents with their newlines.
  * U+2581 "▁" is SentencePiece's own space symbol, so a literal "▁" in the text would
    decode as " ". `encode` emits it as its three UTF-8 byte pieces (byte_fallback) or
    as `<unk>` (no byte pieces), so the round trip stays exact (or visibly lossy).
  * NUL never enters the vocabulary (SentencePiece drops it from training text); it
    round-trips only as a byte piece.
"""

import collections
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from llmjax.data.text_files import TEXT_SUFFIXES, iter_text_files  # noqa: F401 (API)
from llmjax.errors import UserError

PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
FIRST_SENTINEL_ID = 5
MASK_PIECE = "<mask>"
NEWLINE_PIECE = "\n"
MODEL_TYPES = ("bpe", "unigram", "char")
NORMALIZATIONS = ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity")
EXACT_NORMALIZATIONS = ("identity", "nfkc")  # the others rewrite tabs/newlines/controls
DEFAULT_VOCAB_SIZE = 4000
DEFAULT_NUM_SENTINELS = {"bpe": 100, "unigram": 100, "char": 0}
_SPACE = "\u2581"  # SentencePiece's whitespace symbol
_MAX_LINE_CHARS = 4096  # longer lines are cut: SentencePiece skips long sentences
_CHAR_ALL = 1 << 20  # "every character" for char models with vocab_size=None
_SPECIALS = ("<pad>", "</s>", "<s>", "<unk>", MASK_PIECE)


def sentinel_piece(i: int) -> str:
  return f"<extra_id_{i}>"


class Tokenizer:
  """A loaded SentencePiece model with llmjax's fixed special ids.

  `decode` drops pad/bos/eos (control pieces) wherever they are and does not stop at
  EOS; cut at EOS yourself if you need to. Pickles as its serialized model.
  """

  def __init__(self, model_bytes: bytes):
    self._bytes = bytes(model_bytes)
    proto = model_pb2.ModelProto()
    try:
      proto.ParseFromString(self._bytes)
      self._sp = spm.SentencePieceProcessor(model_proto=self._bytes)
    except Exception as e:  # protobuf and sentencepiece raise assorted types
      raise UserError(f"not a SentencePiece model ({e}); pass a .model file written by "
                      "`llmjax tokenizer train`") from e
    pieces = [p.piece for p in proto.pieces]
    if tuple(pieces[:len(_SPECIALS)]) != _SPECIALS:
      raise UserError(f"this SentencePiece model has special pieces {pieces[:5]}, not the "
                      f"llmjax layout {list(_SPECIALS)}; retrain it with `llmjax tokenizer "
                      "train`")
    n = 0
    while pieces[FIRST_SENTINEL_ID + n:][:1] == [sentinel_piece(n)]:
      n += 1
    self._num_sentinels = n
    self._model_type = model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
    self.byte_fallback = proto.trainer_spec.byte_fallback
    self.normalization = proto.normalizer_spec.name
    self.whitespace_exact = (not proto.normalizer_spec.remove_extra_whitespaces and
                             not proto.normalizer_spec.add_dummy_prefix and
                             self._sp.piece_to_id(NEWLINE_PIECE) != UNK_ID)
    # A literal "▁" must not become a space (see module docstring).
    self._space_ids = ([self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE.encode()]
                       if self.byte_fallback else [UNK_ID])

  # --- construction and serialization -------------------------------------------------
  @classmethod
  def from_bytes(cls, model_bytes: bytes) -> "Tokenizer":
    return cls(model_bytes)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not os.path.isfile(path):
      raise UserError(f"tokenizer model {path!r} does not exist; pass the .model file "
                      "written by `llmjax tokenizer train --output PREFIX` (PREFIX.model)")
    with open(path, "rb") as f:
      return cls(f.read())

  def serialized(self) -> bytes:
    return self._bytes

  def save(self, path: str) -> None:
    """Writes the model to `path` atomically (temp file, then rename)."""
    _atomic_write(path, self._bytes)

  def __reduce__(self):  # pickles (e.g. into data-loader workers) as the model bytes
    return (Tokenizer, (self._bytes,))

  def __eq__(self, other):
    return isinstance(other, Tokenizer) and self._bytes == other._bytes

  def __hash__(self):
    return hash(self._bytes)

  def __repr__(self):
    return (f"Tokenizer(model_type={self.model_type!r}, vocab_size={self.vocab_size}, "
            f"num_sentinels={self.num_sentinels}, whitespace_exact={self.whitespace_exact})")

  # --- vocabulary ---------------------------------------------------------------------
  vocab_size = property(lambda self: self._sp.get_piece_size())
  model_type = property(lambda self: self._model_type)
  num_sentinels = property(lambda self: self._num_sentinels)
  pad_id = property(lambda self: PAD_ID)
  eos_id = property(lambda self: EOS_ID)
  bos_id = property(lambda self: BOS_ID)
  unk_id = property(lambda self: UNK_ID)
  mask_id = property(lambda self: MASK_ID)

  def sentinel_id(self, i: int) -> int:
    """Id of `<extra_id_{i}>` (T5 span corruption); i counts from 0."""
    if not 0 <= i < self._num_sentinels:
      raise ValueError(f"sentinel {i} out of range: this model has {self._num_sentinels}")
    return FIRST_SENTINEL_ID + i

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    """Id of `piece`, or UNK_ID when it is not in the vocabulary."""
    return self._sp.piece_to_id(piece)

  # --- encode and decode --------------------------------------------------------------
  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    if self.whitespace_exact and _SPACE in text:
      return self._encode_with_space_symbol(text, add_bos, add_eos)
    # One string, not a list of one: SentencePiece's list path costs ~90 us a call in
    # thread setup (10-20x the encoding of a short line).
    return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                   add_eos: bool = False, num_threads: int = -1) -> list[list[int]]:
    texts = list(texts)
    out = self._sp.encode(texts, add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)
    if self.whitespace_exact:
      for i, text in enumerate(texts):
        if _SPACE in text:
          out[i] = self._encode_with_space_symbol(text, add_bos, add_eos)
    return out

  def _encode_with_space_symbol(self, text, add_bos, add_eos):
    ids = [BOS_ID] if add_bos else []
    for j, part in enumerate(text.split(_SPACE)):
      if j:
        ids.extend(self._space_ids)
      if part:
        ids.extend(self._sp.encode(part))
    return ids + ([EOS_ID] if add_eos else [])

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
    return self._sp.decode([[int(i) for i in ids] for ids in batch])


def from_serialized(data: bytes):
  """Any run's tokenizer from its bytes: a `Tokenizer` for llmjax-layout SentencePiece
  models; for tokenizers imported with a Hugging Face checkpoint (a tokenizer.json, or a
  SentencePiece model with its own special ids) a `llmjax.data.hf_tokenizer` object with
  the same interface."""
  from llmjax.data import hf_tokenizer
  if hf_tokenizer.is_tokenizer_json(data):
    return hf_tokenizer.JsonTokenizer(data)
  proto = model_pb2.ModelProto()
  try:
    proto.ParseFromString(bytes(data))
  except Exception:  # noqa: BLE001 - Tokenizer() reports it as a UserError
    return Tokenizer(data)
  if tuple(p.piece for p in proto.pieces[:len(_SPECIALS)]) != _SPECIALS:
    return hf_tokenizer.SentencePieceTokenizer(data)
  return Tokenizer(data)


def load_any(path: str):
  """`from_serialized` of a file (`tokenizer.model` or an imported `tokenizer.json`)."""
  if not os.path.isfile(path):
    raise UserError(f"tokenizer file {path!r} does not exist; pass a .model or "
                    "tokenizer.json file")
  with open(path, "rb") as f:
    return from_serialized(f.read())


def tokenizer_stats(tokenizer: Tokenizer, texts: Iterable[str]) -> dict:
  """Compression and coverage of `tokenizer` on `texts`: chars/token, unk and byte rates."""
  counts = collections.Counter()
  for text in texts:
    ids = tokenizer.encode(text)
    counts["texts"] += 1
    counts["chars"] += len(text)
    counts["tokens"] += len(ids)
    counts["unk"] += sum(1 for i in ids if i == UNK_ID)
    if tokenizer.byte_fallback:
      counts["bytes"] += sum(1 for i in ids if tokenizer._sp.is_byte(i))
  tokens = max(counts["tokens"], 1)
  return {"vocab_size": tokenizer.vocab_size, "texts": counts["texts"],
          "chars": counts["chars"], "tokens": counts["tokens"],
          "chars_per_token": counts["chars"] / tokens, "unk_rate": counts["unk"] / tokens,
          "byte_rate": counts["bytes"] / tokens}


# --- training -----------------------------------------------------------------------
def _atomic_write(path: str, data: bytes) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _write_corpus(texts: Iterable[str], path: str) -> int:
  """Writes `texts` one line per sentence; returns the count of non-blank lines."""
  nonblank = 0
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for text in texts:
      for line in text.split("\n"):
        for i in range(0, len(line), _MAX_LINE_CHARS):
          chunk = line[i:i + _MAX_LINE_CHARS]
          nonblank += bool(chunk.strip())
          f.write(chunk + "\n")
  return nonblank


def _check_args(model_type, vocab_size, character_coverage, normalization, whitespace_exact,
                num_sentinels, byte_fallback):
  if model_type not in MODEL_TYPES:
    raise UserError(f"unknown model_type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
  if normalization not in NORMALIZATIONS:
    raise UserError(f"unknown normalization {normalization!r}; use one of "
                    f"{', '.join(NORMALIZATIONS)}")
  if whitespace_exact and normalization not in EXACT_NORMALIZATIONS:
    raise UserError(f"normalization {normalization!r} rewrites whitespace, so it cannot be "
                    "whitespace-exact; use normalization='identity' (or 'nfkc')")
  if not 0.0 < character_coverage <= 1.0:
    raise UserError(f"character_coverage={character_coverage} must be in (0, 1]; "
                    "use 1.0 for small alphabets, 0.9995 for CJK-heavy text")
  if num_sentinels < 0:
    raise UserError(f"num_sentinels={num_sentinels} must be >= 0")
  fixed = len(_SPECIALS) + num_sentinels + whitespace_exact + 256 * byte_fallback
  if vocab_size is not None and vocab_size <= fixed:
    raise UserError(f"vocab_size={vocab_size} leaves no room for text pieces: {fixed} ids "
                    "go to special tokens, sentinels, newline and byte pieces; raise "
                    "vocab_size or lower num_sentinels")


def _translate_error(e: RuntimeError, model_type, character_coverage) -> Exception:
  msg = str(e)
  m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
  if m:
    return UserError(f"vocab_size={m[1]} is too large for this corpus: the {model_type} "
                     f"trainer can make at most {m[2]} pieces from it; set vocab_size <= "
                     f"{m[2]} (--vocab_size {m[2]}) or train on more text")
  m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
  if m:
    return UserError(f"vocab_size={m[1]} is too small: the corpus has {m[2]} characters "
                     f"and special pieces to keep at character_coverage="
                     f"{character_coverage}; raise vocab_size above {m[2]} or lower "
                     "character_coverage (e.g. 0.9995)")
  return e


def train_tokenizer(texts: Iterable[str], output_prefix: str, *, model_type: str = "bpe",
                    vocab_size: int | None = None, character_coverage: float = 1.0,
                    normalization: str | None = None, byte_fallback: bool = False,
                    whitespace_exact: bool = False, num_sentinels: int | None = None,
                    seed: int = 0, input_sentence_size: int = 2_000_000,
                    num_threads: int | None = None) -> Tokenizer:
  """Trains a SentencePiece model on `texts` and writes `{output_prefix}.model`/`.vocab`.

  vocab_size: 4000 for bpe/unigram when None; for char, None means every character
    (at `character_coverage`), and an explicit value larger than that is an error.
  normalization: 'nmt_nfkc' when None, or 'identity' with whitespace_exact.
  num_sentinels: 100 for bpe/unigram, 0 for char when None.
  input_sentence_size: lines sampled for training (SentencePiece loads them in RAM).
  The .vocab file is informational: `piece<TAB>score` with \\n, \\t, \\r escaped.
  Deterministic for the same texts, arguments and seed. Both files are written only
  after training succeeds, each by rename.
  """
  normalization = normalization or ("identity" if whitespace_exact else "nmt_nfkc")
  if num_sentinels is None:
    num_sentinels = DEFAULT_NUM_SENTINELS.get(model_type, 0)
  _check_args(model_type, vocab_size, character_coverage, normalization, whitespace_exact,
              num_sentinels, byte_fallback)
  if output_prefix.endswith(("/", os.sep)) or os.path.isdir(output_prefix):
    raise UserError(f"output {output_prefix!r} is a folder; pass a file prefix such as "
                    f"{os.path.join(output_prefix, 'spm')!r} (writes spm.model, spm.vocab)")
  if vocab_size is None and model_type != "char":
    vocab_size = DEFAULT_VOCAB_SIZE
  specials = [MASK_PIECE] + [sentinel_piece(i) for i in range(num_sentinels)]
  specials += [NEWLINE_PIECE] if whitespace_exact else []
  kwargs = {
      "model_type": model_type, "vocab_size": vocab_size or _CHAR_ALL,
      "character_coverage": character_coverage, "normalization_rule_name": normalization,
      "byte_fallback": byte_fallback, "user_defined_symbols": specials,
      "input_sentence_size": input_sentence_size,
      "num_threads": num_threads or min(os.cpu_count() or 1, 16)}
  if whitespace_exact:
    kwargs.update(remove_extra_whitespaces=False, add_dummy_prefix=False,
                  allow_whitespace_only_pieces=True, split_by_whitespace=True)
  with tempfile.TemporaryDirectory(prefix="llmjax_spm_") as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    if not _write_corpus(texts, corpus):
      raise UserError("the training corpus is empty (no text with a non-space character); "
                      "check the input files, dataset split or text field")
    model = _train(corpus, kwargs, seed, character_coverage)
  proto = model_pb2.ModelProto()
  proto.ParseFromString(model)
  # Drop the temp corpus path (and our prefix) so the same input gives the same bytes.
  proto.trainer_spec.ClearField("input")
  proto.trainer_spec.ClearField("model_prefix")
  tokenizer = Tokenizer(proto.SerializeToString())
  _check_trained(tokenizer, vocab_size, num_sentinels, whitespace_exact)
  vocab = "".join(f"{_escape(p.piece)}\t{p.score:g}\n" for p in proto.pieces)
  _atomic_write(output_prefix + ".vocab", vocab.encode("utf-8"))
  tokenizer.save(output_prefix + ".model")
  return tokenizer


def _train(corpus, kwargs, seed, character_coverage) -> bytes:
  spm.set_random_generator_seed(seed)
  writer = _BytesWriter()
  try:
    spm.SentencePieceTrainer.train(
        input=corpus, model_writer=writer, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID,
        unk_id=UNK_ID, shuffle_input_sentence=True, minloglevel=2,
        max_sentence_length=4 * _MAX_LINE_CHARS + 16, **kwargs)
  except RuntimeError as e:
    raise _translate_error(e, kwargs["model_type"], character_coverage) from e
  return writer.data


class _BytesWriter:
  data = b""

  def write(self, data: bytes) -> None:
    self.data += data


def _check_trained(tok: Tokenizer, vocab_size, num_sentinels, whitespace_exact):
  """The layout is a promise to every later stage: verify it, never assume it."""
  if vocab_size is not None and tok.vocab_size != vocab_size:
    raise UserError(f"vocab_size={vocab_size} is too large for this corpus: a {tok.model_type}"
                    f" model of it has only {tok.vocab_size} pieces; set vocab_size <= "
                    f"{tok.vocab_size}, or leave it unset for every character")
  assert tok.num_sentinels == num_sentinels, (tok.num_sentinels, num_sentinels)
  assert tok.whitespace_exact == whitespace_exact
  if whitespace_exact:
    assert tok.piece_to_id(NEWLINE_PIECE) == FIRST_SENTINEL_ID + num_sentinels


def _escape(piece: str) -> str:
  return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")

