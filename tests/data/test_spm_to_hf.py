"""SentencePiece -> Hugging Face tokenizer files (`llmjax.data.spm_to_hf`): the converted
tokenizer encodes and decodes the plays as SentencePiece does, for the tokenizer kinds
llmjax trains; and an exported run's `AutoTokenizer` + `generate` prints what
`llmjax generate --temperature=0` prints."""

import os
import shutil

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from llmjax import cli
from llmjax.data import spm_to_hf
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.data.tfds_builders.shakespeare import play_files

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "a5996b6_tiny_run")


@pytest.fixture(scope="module")
def play():
  return play_files()[0][1].read_text()


@pytest.mark.parametrize("kind", [
    {"model_type": "bpe", "whitespace_exact": True},          # the default data config's
    {"model_type": "char", "whitespace_exact": True},         # the debug runs'
    {"model_type": "unigram", "byte_fallback": True},         # nmt_nfkc, dummy prefix
    {"model_type": "bpe", "normalization": "nmt_nfkc"}])
def test_converted_tokenizer_encodes_like_sentencepiece(kind, play, tmp_path):
  lines = play.splitlines()[:2500]
  size = None if kind["model_type"] == "char" else 600
  tok = tokenizer_lib.train_tokenizer(lines, str(tmp_path / "t"), vocab_size=size,
                                      num_sentinels=2, **kind)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=spm_to_hf.to_tokenizers(
      tok.serialized()))
  probes = [play[20_000:24_000], "  To be,  or not\tto be:\n\n  that is the question.  ",
            "naïve café ½ — ﬁ Ⅳ"]
  if tok.whitespace_exact:  # special pieces typed in the text: spm_to_hf's known difference
    probes += ["x<mask> y<extra_id_1>z", "x <mask>  y <extra_id_0>  z"]
  for text in probes:
    ids = tok.encode(text)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:40]
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), text[:40]
  assert hf("a")["input_ids"] == tok.encode("a", add_bos=True)  # BOS, as generate adds


def test_export_generates_like_llmjax_generate(tmp_path, capsys):
  work = tmp_path / "run"
  shutil.copytree(FIXTURE, work)
  prompt, n = "ROMEO:\nO, she doth", 12
  assert cli.main(["generate", f"--workdir={work}", f"--prompt={prompt}",
                   f"--max_new_tokens={n}", "--temperature=0"]) == 0
  printed = capsys.readouterr().out
  assert cli.main(["convert", f"--workdir={work}", f"--to_hf={tmp_path / 'hf'}"]) == 0
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  assert (model.config.bos_token_id, model.config.eos_token_id) == (
      tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID)
  inputs = tok(prompt, return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n)
  text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
  assert printed == prompt + text + "\n"
