"""A SentencePiece model -> the Hugging Face tokenizer files (`tokenizer.json` & co).

`llmjax convert --to_hf` writes these beside the weights so that
`AutoTokenizer.from_pretrained(folder)` encodes a prompt as `llmjax generate` does (BOS,
then the pieces) and decodes what `generate` would print. transformers 5 converts
SentencePiece files itself only for the model families it knows, each with that family's
whitespace rules; llmjax's tokenizers have their own (whitespace-exact mode, char
models), so the conversion is written out here, from the model's protobuf:

- Model: unigram pieces and scores -> `tokenizers` Unigram; BPE (and char, a BPE
  without merges) -> `tokenizers` BPE whose merge ranks are the merged pieces' ids
  (SentencePiece merges the pair whose result scores highest; its BPE scores fall with
  the id). Byte fallback carries over.
- Normalization: the precompiled NFKC charsmap (if any); `remove_extra_whitespaces`
  strips and collapses spaces; spaces become U+2581, prefixed once (`add_dummy_prefix`).
- Words: SentencePiece starts a word at a space, and with
  `allow_whitespace_only_pieces` (whitespace-exact mode) a run of spaces and the word
  after it are one word: a `Split` on that pattern instead of `Metaspace` splitting.
- Control and user-defined pieces (`<pad>`, `</s>`, `<s>`, `<mask>`, sentinels, the
  newline piece) are added tokens; `<unk>` decodes to SentencePiece's " \u2047 ".

Known difference: in a model that is not whitespace-exact (`remove_extra_whitespaces`,
a dummy prefix), user-defined and control pieces typed into the text (`"x <mask> y"`)
are not always split out as SentencePiece splits them (`tokenizers` matches them in the
normalized text, whose spaces and prefix differ). Whitespace-exact models (llmjax's
default data config) match exactly. Tests compare both encoders on the plays and on
whitespace, Unicode and special pieces.
"""

import json

from sentencepiece import sentencepiece_model_pb2 as model_pb2

from llmjax.errors import UserError

_SPACE = "\u2581"
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_UNIGRAM = 1


def _merges(proto) -> list[tuple[str, str]]:
  """BPE merges ranked by the id of the piece they make (lower id = merged first)."""
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  found = []
  for i, p in enumerate(proto.pieces):
    if p.type != _NORMAL:
      continue
    for k in range(1, len(p.piece)):
      left, right = p.piece[:k], p.piece[k:]
      if left in vocab and right in vocab:
        found.append((i, vocab[left], vocab[right], left, right))
  return [(left, right) for *_, left, right in sorted(found)]


def to_tokenizers(model_bytes: bytes):
  """A `tokenizers.Tokenizer` that encodes and decodes as the SentencePiece model does,
  with a post-processor that prepends BOS (`add_special_tokens=True`)."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
  from tokenizers import pre_tokenizers as pre

  proto = model_pb2.ModelProto()
  try:
    proto.ParseFromString(model_bytes)
  except Exception as e:  # protobuf raises DecodeError
    raise UserError(f"not a SentencePiece model ({e}); pass a valid .model file") from e
  spec, norm_spec = proto.trainer_spec, proto.normalizer_spec
  unk = proto.pieces[spec.unk_id].piece
  if spec.model_type == _UNIGRAM:
    model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=spec.unk_id,
                           byte_fallback=spec.byte_fallback)
  else:  # bpe; char is a bpe without merges
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    model = models.BPE(vocab, _merges(proto), unk_token=unk, fuse_unk=True,
                       byte_fallback=spec.byte_fallback)
  tok = Tokenizer(model)
  steps = [normalizers.Precompiled(norm_spec.precompiled_charsmap)] \
      if norm_spec.precompiled_charsmap else []
  if norm_spec.remove_extra_whitespaces:
    steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
  if norm_spec.add_dummy_prefix:  # once, before the whole text
    steps.append(normalizers.Prepend(_SPACE))
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPACE)])
  if spec.allow_whitespace_only_pieces:
    tok.pre_tokenizer = pre.Split(Regex(f"{_SPACE}+[^{_SPACE}]*|[^{_SPACE}]+"),
                                  behavior="isolated")
  else:
    tok.pre_tokenizer = pre.Metaspace(replacement=_SPACE, prepend_scheme="never",
                                      split=spec.split_by_whitespace)
  prepend = "always" if norm_spec.add_dummy_prefix else "never"
  tok.decoder = decoders.Sequence(
      [decoders.Replace(unk, " \u2047 ")] + ([decoders.ByteFallback()] if spec.byte_fallback
                                             else [])
      + [decoders.Metaspace(replacement=_SPACE, prepend_scheme=prepend)])
  # Normalized added tokens are found in the normalized text: the whole text is stripped
  # and collapsed first, as SentencePiece does (unnormalized ones would split it first).
  # Whitespace-exact models keep the raw text, so their newline piece can match.
  normalized = bool(norm_spec.remove_extra_whitespaces)
  tok.add_tokens([AddedToken(p.piece, normalized=normalized, special=p.type == _CONTROL)
                  for p in proto.pieces if p.type in (_CONTROL, _USER_DEFINED)])
  if spec.bos_id >= 0:
    bos = proto.pieces[spec.bos_id].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, spec.bos_id)])
  return tok


def hf_tokenizer_files(model_bytes: bytes, max_len: int) -> dict[str, bytes]:
  """`tokenizer.json`, `tokenizer_config.json` and the `tokenizer.model` itself."""
  proto = model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  spec = proto.trainer_spec
  piece = lambda i: proto.pieces[i].piece if i >= 0 else None
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id),
            "unk_token": piece(spec.unk_id), "pad_token": piece(spec.pad_id),
            "clean_up_tokenization_spaces": False}
  return {"tokenizer.json": to_tokenizers(model_bytes).to_str().encode("utf-8"),
          "tokenizer_config.json": json.dumps(config, indent=2).encode("utf-8"),
          "tokenizer.model": bytes(model_bytes)}


def special_ids(model_bytes: bytes) -> dict[str, int]:
  """`{bos,eos,pad}_token_id` for config.json (those the model has)."""
  proto = model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  spec = proto.trainer_spec
  return {f"{name}_token_id": i for name, i in
          (("bos", spec.bos_id), ("eos", spec.eos_id), ("pad", spec.pad_id)) if i >= 0}
