"""`llmjax convert` end to end: a tiny GPT-2 with a tokenizer.json -> workdir -> `llmjax
generate` (greedy, equal to transformers' greedy continuation) -> back to a HF folder;
and a LLaMA-layout SentencePiece tokenizer stored with the converted run."""

import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.checkpoint.convert import workdir as workdir_lib
from llmjax.data import hf_tokenizer
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "big", "red", "hat"]


def _word_tokenizer():
  vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<|endoftext|>"])
  return tok


def test_gpt2_convert_generate_export(tmp_path, capsys):
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(WORDS) + 2,
                                n_positions=32, bos_token_id=0, eos_token_id=0)
  hf = transformers.GPT2LMHeadModel(cfg).eval()
  hf.save_pretrained(tmp_path / "hf")
  _word_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
  work = tmp_path / "run"
  assert cli.main(["convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={work}"]) == 0
  assert (work / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
  # A second import into the same workdir would mix runs: refused, nothing written.
  assert cli.main(["convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={work}"]) == 2
  capsys.readouterr()

  assert cli.main(["generate", f"--workdir={work}", "--prompt=the cat sat",
                   "--max_new_tokens=6", "--temperature=0"]) == 0
  printed = capsys.readouterr().out
  tok = hf_tokenizer.JsonTokenizer((work / "tokenizer.json").read_bytes())
  ids = torch.tensor([tok.encode("the cat sat", add_bos=True)])
  new = []
  with torch.no_grad():
    for _ in range(6):
      nxt = int(hf(input_ids=ids).logits[0, -1].argmax())
      new.append(nxt)
      ids = torch.cat([ids, torch.tensor([[nxt]])], axis=1)
      if nxt == tok.eos_id:
        break
  assert printed == "the cat sat" + tok.decode(new) + "\n"

  out = tmp_path / "exported"
  assert cli.main(["convert", f"--to_hf={out}", f"--workdir={work}"]) == 0
  back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  tokens = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
  with torch.no_grad():
    assert torch.equal(back(input_ids=tokens).logits, hf(input_ids=tokens).logits)
  assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
  assert (out / "tokenizer.json").exists()


def test_llama_sentencepiece_tokenizer_is_stored(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  writer = io.BytesIO()
  lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer,
                                 vocab_size=30, minloglevel=2)  # LLaMA layout: unk 0 bos 1 eos 2
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                 intermediate_size=48, vocab_size=40)
  transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.model").write_bytes(writer.getvalue())
  work = tmp_path / "run"
  workdir_lib.hf_to_workdir(str(tmp_path / "hf"), str(work), log=lambda *_: None)
  meta = ckpt_lib.CheckpointManager(str(work / "checkpoints")).restore_meta()
  tok = tokenizer_lib.from_serialized(ckpt_lib.decode_bytes(meta["tokenizer"]))
  assert isinstance(tok, hf_tokenizer.SentencePieceTokenizer)
  assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.decode(tok.encode("the cat sat", add_bos=True, add_eos=True)) == "the cat sat"
  assert tokenizer_lib.load_any(str(work / "tokenizer.model")) == tok
  assert meta["hf_model_type"] == "llama"
  with pytest.raises(UserError, match="already holds checkpoints"):
    workdir_lib.hf_to_workdir(str(tmp_path / "hf"), str(work), log=lambda *_: None)


def test_a_folder_without_a_tokenizer_then_tokenizer_flag_or_force(tmp_path, capsys):
  """Converted without a tokenizer: `generate` says to pass --tokenizer (no traceback)
  and works with it; after adding one to the folder, `convert --force` stores it."""
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(WORDS) + 2,
                                n_positions=32, bos_token_id=0, eos_token_id=0)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
  work = tmp_path / "run"
  assert cli.main(["convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={work}"]) == 0
  assert "--tokenizer=PATH" in capsys.readouterr().out
  args = ["generate", f"--workdir={work}", "--prompt=the cat", "--max_new_tokens=3",
          "--temperature=0"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "has no tokenizer" in err and "--tokenizer=PATH" in err and "Traceback" not in err
  _word_tokenizer().save(str(tmp_path / "tokenizer.json"))
  assert cli.main(args + [f"--tokenizer={tmp_path / 'tokenizer.json'}"]) == 0
  with_flag = capsys.readouterr().out
  assert with_flag.startswith("the cat")

  (tmp_path / "hf" / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
  assert cli.main(["convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={work}"]) == 2
  assert "--force" in capsys.readouterr().err
  assert cli.main(["convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={work}",
                   "--force"]) == 0
  assert ckpt_lib.CheckpointManager(str(work / "checkpoints")).all_steps() == [0]
  capsys.readouterr()
  assert cli.main(args) == 0
  assert capsys.readouterr().out == with_flag
