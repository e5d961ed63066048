"""Prompt tuning (`llmjax.peft.prompt_tuning`): logits against a plain model that is fed
the soft prompt by hand (as k extra rows of its token table), on every architecture;
cached greedy decoding (the prompt in the prefill) against the full forward pass;
initialisation from text; metadata; the refused inputs."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import cli
from llmjax.checkpoint import manager as ckpt_lib
from llmjax.decode.generate import generate
from llmjax.decode.sampling import SamplingConfig
from llmjax.errors import UserError
from llmjax.models.transformer import Transformer
from llmjax.peft import model as peft_lib
from llmjax.peft.lora import LoraConfig
from llmjax.peft.model import PeftModel
from llmjax.peft.prompt_tuning import PromptTuningConfig
from llmjax.testing import reference, runs

K = 3
PROMPT = PromptTuningConfig(length=K)


@functools.cache
def _model(preset):
  return reference.preset_model(preset, std=0.05)


def _with_prompt(preset, configs=(PROMPT,)):
  """(PeftModel, params: the base's weights and a soft prompt of noise)."""
  model, base = _model(preset)
  net = PeftModel(model, list(configs))
  tokens = jnp.ones((1, 4), jnp.int32)
  kw = {"encoder_tokens": tokens} if model.config.arch == "encoder_decoder" else {}
  shapes = nn.meta.unbox(jax.eval_shape(lambda: net.init(jax.random.PRNGKey(1), tokens, **kw)))
  rng = np.random.default_rng(3)

  def fill(tree, ref):
    return {k: fill(v, ref[k]) if isinstance(v, dict) else ref[k] if k in ref else
            jnp.asarray(0.5 * rng.normal(size=v.shape), jnp.float32) for k, v in tree.items()}
  return net, fill(shapes["params"], base)


def _by_hand(model, params, prompt):
  """A plain model whose token table has the k prompt vectors as rows V..V+k-1 (zero
  columns in an untied head and the logits bias), and those ids."""
  cfg = model.config
  vocab, k = cfg.vocab_size, prompt.shape[0]
  big = jax.tree.map(lambda x: x, params)
  big["embed"] = {"embedding": jnp.concatenate([params["embed"]["embedding"], prompt])}
  if "lm_head" in big:
    big["lm_head"] = {"kernel": jnp.pad(params["lm_head"]["kernel"], ((0, 0), (0, k)))}
  if "logits_bias" in big:
    big["logits_bias"] = jnp.pad(params["logits_bias"], (0, k))
  return Transformer(cfg.replace(vocab_size=vocab + k)), big, vocab + np.arange(k)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "bert-tiny", "t5-tiny"])
def test_logits_equal_a_plain_model_fed_the_prompt_by_hand(preset):
  net, params = _with_prompt(preset)
  cfg = net.config
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 100, (2, 8)).astype(np.int32)
  segments = np.ones((2, 8), np.int32)
  segments[1, 6:] = 0                                      # a right-padded row
  plain, big, ids = _by_hand(net.base, params, params["embed"]["prompt_default"])
  with_ids = np.concatenate([np.broadcast_to(ids, (2, K)), tokens], axis=1)
  with_segments = np.concatenate([np.ones((2, K), np.int32), segments], axis=1)
  if cfg.arch == "encoder_decoder":  # the prompt is the encoder's
    source = tokens[:, :6]
    got = net.apply({"params": params}, tokens, encoder_tokens=source,
                    encoder_segment_ids=segments[:, :6])
    want = plain.apply({"params": big}, tokens, encoder_tokens=with_ids[:, :K + 6],
                       encoder_segment_ids=with_segments[:, :K + 6])
  else:
    got = net.apply({"params": params}, tokens, segments)
    want = plain.apply({"params": big}, with_ids, with_segments)[:, K:]
  assert got.shape == (2, 8, cfg.vocab_size)
  np.testing.assert_allclose(got, want[..., :cfg.vocab_size], rtol=1e-5, atol=1e-5)
  base = net.base.apply({"params": params}, tokens, **(
      {"encoder_tokens": tokens[:, :6]} if cfg.arch == "encoder_decoder" else {}))
  assert float(jnp.abs(got - base).max()) > 1e-2           # the prompt does something


def test_encode_returns_the_usual_shapes():
  net, params = _with_prompt("bert-tiny")
  tokens = jnp.ones((2, 5), jnp.int32)
  assert net.apply({"params": params}, tokens, method="encode").shape == (2, 5, 64)
  net, params = _with_prompt("t5-tiny")  # encoder_decoder: the decoder sees the prompt
  encoded = net.apply({"params": params}, tokens, method=Transformer.encode)
  assert encoded.shape == (2, 5 + K, 64)
  full = net.apply({"params": params}, tokens[:, :3], encoder_tokens=tokens,
                   encoder_segment_ids=jnp.ones((2, 5), jnp.int32))
  by_parts = net.apply({"params": params}, tokens[:, :3], encoded=encoded,
                       encoder_segment_ids=jnp.ones((2, 5), jnp.int32),
                       method=Transformer.decode)
  np.testing.assert_allclose(by_parts, full, rtol=1e-6, atol=1e-6)


def _greedy(net, params, rows, steps, **kw):
  """Greedy continuations without a cache: the whole (right-padded) rows every step."""
  total = max(len(r) for r in rows) + steps
  forward = jax.jit(lambda p, t: net.apply({"params": p}, t, **kw))
  rows = [list(r) for r in rows]
  for _ in range(steps):
    logits = forward(params, jnp.asarray([r + [0] * (total - len(r)) for r in rows]))
    for i, row in enumerate(rows):
      row.append(int(jnp.argmax(logits[i, len(row) - 1])))
  return rows


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_cached_greedy_decoding_sees_the_prompt(preset):
  lora = LoraConfig(target="attention", rank=2)  # merged away by `merged`; the prompt stays
  net, params = _with_prompt(preset, [PromptTuningConfig(length=K), lora])
  model, merged = net.merged(params)
  prompts = [[5, 9, 23, 7, 11], [42, 8]]                  # different lengths: left padding
  out = generate(model, merged, prompts, max_new_tokens=6, sampling=SamplingConfig(0.0))
  want = _greedy(net, params, prompts, 6)
  assert out.rows() == [w[len(p):] for w, p in zip(want, prompts)]
  without = generate(net.base, params, prompts, max_new_tokens=6,
                     sampling=SamplingConfig(0.0))
  assert without.rows() != out.rows()


def test_encoder_decoder_cached_decoding_sees_the_prompt():
  net, params = _with_prompt("t5-tiny")
  sources = [[5, 9, 23, 7, 11], [42, 8]]
  out = generate(net, params, None, encoder_inputs=sources, max_new_tokens=5,
                 sampling=SamplingConfig(0.0))
  padded = jnp.asarray([s + [0] * (5 - len(s)) for s in sources])
  want = _greedy(net, params, [[0], [0]], 5, encoder_tokens=padded,
                 encoder_segment_ids=(padded != 0).astype(jnp.int32))
  assert out.rows() == [w[1:] for w in want]


class _Chars:
  def encode(self, text, add_bos=False):
    return [ord(c) - 90 for c in text] + ([1] if add_bos else [])


def test_init_from_text_repeats_the_text_embeddings():
  config = PromptTuningConfig(length=5, init_text="ab")
  net, params = _with_prompt("tiny", [config])
  params = peft_lib.init_prompts(params, net.configs, _Chars())
  table = params["embed"]["embedding"]
  np.testing.assert_array_equal(params["embed"]["prompt_default"], table[np.array([7, 8, 7, 8, 7])])
  empty = type("Empty", (), {"encode": lambda self, text, add_bos=False: []})()
  with pytest.raises(UserError, match="encodes to no tokens"):
    peft_lib.init_prompts(params, [PromptTuningConfig(length=2, init_text="x")], empty)


def test_metadata_merging_and_export_refusal():
  config = PromptTuningConfig(length=4, init_text="Summarize:", name="task1")
  meta = {"peft": peft_lib.to_meta([config])}
  assert meta["peft"][0] == {"method": "prompt_tuning", "length": 4,
                             "init_text": "Summarize:", "name": "task1"}
  assert peft_lib.from_meta(meta["peft"]) == [config]
  model, _ = _model("tiny")
  kept, params = peft_lib.merged_model(model, {"embed": {}}, meta)
  assert isinstance(kept, PeftModel) and kept.configs == (config,) and params == {"embed": {}}
  assert config.trainable == r"(^|/)embed/prompt_task1$"
  with pytest.raises(UserError, match="PromptTuningConfig, which cannot be folded"):
    peft_lib.require_mergeable(meta)


def test_refused_inputs_are_user_errors():
  net, params = _with_prompt("tiny")
  tokens = jnp.ones((1, 8), jnp.int32)
  packed = jnp.asarray([[1, 1, 1, 2, 2, 2, 3, 0]])
  with pytest.raises(UserError, match=r"packs up to 3; set DataConfig.packing='none'"):
    net.apply({"params": params}, tokens, packed)
  with pytest.raises(UserError, match="exceed max_len=64"):
    net.apply({"params": params}, jnp.ones((1, 63), jnp.int32))
  with pytest.raises(UserError, match="packing='first_fit' packs several"):
    peft_lib.check_data(net.configs, type("Data", (), {"packing": "first_fit"})())
  with pytest.raises(UserError, match="one soft prompt per model"):
    PeftModel(net.base, [PromptTuningConfig(), PromptTuningConfig(name="b")])
  with pytest.raises(UserError, match="length=0 must be a positive"):
    PromptTuningConfig(length=0)


def test_prompt_tuning_run_from_a_checkpoint(tmp_path, data_dir, capsys, fixture_run):
  """`--gin_file=peft/prompt_tuning.gin` on a warm start, the prompt from a text: only
  the prompt trains and has optimizer state; the end-of-run sample and generate see it."""
  source, work = fixture_run, str(tmp_path / "prompt")
  assert runs.warm_start_train(work, data_dir, source, "peft/prompt_tuning.gin", sample=True,
                               params=[
      "TrainConfig.num_steps=6", "TrainConfig.checkpoint_every=6",
      "DataConfig.seq_len=32",  # + 4 prompt slots within max_len=64
      "OptimizerConfig.peak_lr=0.05", "PromptTuningConfig.length=4",
      "PromptTuningConfig.init_text='ROMEO'", "RuntimeConfig.sample_tokens=8"]) == 0
  out = capsys.readouterr().out
  assert "soft prompt 'default': 4 vectors from the embeddings of 'ROMEO'" in out
  assert "--- sample" in out
  base = runs.param_leaves(
      ckpt_lib.CheckpointManager(os.path.join(source, "checkpoints")).read()[0]["params"])
  state, _, meta = ckpt_lib.CheckpointManager(os.path.join(work, "checkpoints")).read(6)
  tuned = runs.param_leaves(state["params"])
  assert set(tuned) - set(base) == {"['embed']['prompt_default']"}
  for key, value in base.items():  # the base: bitwise the source's after 6 steps
    np.testing.assert_array_equal(tuned[key], value, err_msg=key)
  prompt = tuned["['embed']['prompt_default']"]
  assert prompt.shape == (4, 16)
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
  assert sum(np.size(x) for x in moments) == 2 * prompt.size
  assert meta["peft"] == [{"method": "prompt_tuning", "length": 4, "init_text": "ROMEO",
                           "name": "default"}]

  args = ["--prompt=ROMEO:", "--max_new_tokens=8", "--temperature=0"]
  assert cli.main(["generate", f"--workdir={work}", *args]) == 0
  tuned_text = capsys.readouterr().out
  assert cli.main(["generate", f"--workdir={source}", *args]) == 0
  assert tuned_text.startswith("ROMEO:") and tuned_text != capsys.readouterr().out
  assert cli.main(["convert", f"--workdir={work}", f"--to_hf={tmp_path / 'hf'}"]) == 2
  assert "PromptTuningConfig, which cannot be folded" in capsys.readouterr().err
  # The soft prompt alone, through a PEFT PROMPT_TUNING folder and back onto the base.
  peft_dir, back = tmp_path / "peft_prompt", str(tmp_path / "back")
  assert cli.main(["peft", "export", f"--workdir={work}", f"--to_peft={peft_dir}"]) == 0
  assert cli.main(["peft", "import", f"--from_peft={peft_dir}", f"--workdir={source}",
                   f"--output={back}"]) == 0
  capsys.readouterr()
  assert cli.main(["generate", f"--workdir={back}", *args]) == 0
  assert capsys.readouterr().out == tuned_text
