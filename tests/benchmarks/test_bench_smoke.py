"""The benchmarks compare the same work: llmjax, the PyTorch reference and HF GPT-2 agree.

At the benchmarks' tiny shape: equal parameter counts, initial losses near ln(V), and,
with the reference's weights copied into the other two, equal logits (a real parity
check of the three model setups the timing runs use, not a timing).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from benchmarks import common, train_vs_torch
from llmjax.models import stack
from llmjax.models.transformer import Transformer

SHAPE = "tiny"
LAYERS, HEADS, WIDTH, SEQ_LEN, BATCH = train_vs_torch.SHAPES[SHAPE]


def _llmjax():
  model = Transformer(train_vs_torch.llmjax_config(SHAPE))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                    jnp.zeros((1, SEQ_LEN), jnp.int32))["params"])
  return model, params


def _params_from_reference(ref: torch.nn.Module) -> dict:
  """torch_gpt.GPT's state dict -> llmjax's scanned parameter tree (written from scratch)."""
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}
  h = WIDTH // HEADS

  def layer(i):
    p = f"h.{i}."
    qkv_w = sd[p + "attn.c_attn.weight"].T.reshape(WIDTH, 3, HEADS, h)   # [D, 3, N, H]
    qkv_b = sd[p + "attn.c_attn.bias"].reshape(3, HEADS, h)
    proj = {name: {"kernel": qkv_w[:, j], "bias": qkv_b[j]}
            for j, name in enumerate(("query", "key", "value"))}
    proj["out"] = {"kernel": sd[p + "attn.c_proj.weight"].T.reshape(HEADS, h, WIDTH),
                   "bias": sd[p + "attn.c_proj.bias"]}
    return {
        "attention": proj,
        "attention_norm": {"scale": sd[p + "ln_1.weight"], "bias": sd[p + "ln_1.bias"]},
        "mlp_norm": {"scale": sd[p + "ln_2.weight"], "bias": sd[p + "ln_2.bias"]},
        "mlp": {"wi": {"kernel": sd[p + "mlp.c_fc.weight"].T, "bias": sd[p + "mlp.c_fc.bias"]},
                "wo": {"kernel": sd[p + "mlp.c_proj.weight"].T,
                       "bias": sd[p + "mlp.c_proj.bias"]}},
    }

  layers = jax.tree.map(lambda *a: np.stack(a), *[layer(i) for i in range(LAYERS)])
  return {"embed": {"embedding": sd["wte.weight"]},
          "pos_embed": {"embedding": sd["wpe.weight"]},
          "decoder": {"layers": layers, "final_norm": {"scale": sd["ln_f.weight"],
                                                       "bias": sd["ln_f.bias"]}}}


def _copy_reference_into_hf(ref, hf):
  """HF GPT-2 keeps Conv1D weights as [in, out]: the transpose of nn.Linear's."""
  sd = ref.state_dict()
  out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
         "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": sd["ln_f.bias"]}
  for key, value in sd.items():
    if key.startswith("h."):
      linear = key.endswith("weight") and ("c_attn" in key or "c_proj" in key or "c_fc" in key)
      out["transformer." + key] = value.T.contiguous() if linear else value
  missing, unexpected = hf.load_state_dict(out, strict=False)
  assert not unexpected and all(m.endswith(("attn.bias", "masked_bias", "lm_head.weight"))
                                for m in missing), (missing, unexpected)


@pytest.fixture(scope="module")
def models():
  torch.manual_seed(0)
  ref = train_vs_torch.torch_model("ref", SHAPE)
  hf = train_vs_torch.torch_model("hf", SHAPE)
  return ref.eval(), hf.eval(), *_llmjax()


def test_parameter_counts_are_equal(models):
  ref, hf, _, params = models
  counts = {"ref": sum(p.numel() for p in ref.parameters()),
            "hf": sum(p.numel() for p in hf.parameters()),
            "llmjax": sum(math.prod(x.shape) for x in jax.tree.leaves(params))}
  assert len(set(counts.values())) == 1, counts


def test_initial_losses_are_near_ln_vocab(models):
  ref, hf, model, params = models
  x, y = common.get_batch(np.arange(5000) % 65, BATCH, SEQ_LEN, seed=0, index=0)
  xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()
  with torch.no_grad():
    losses = {"ref": ref(xt, yt)[1].item(),
              "hf": torch.nn.functional.cross_entropy(hf(input_ids=xt).logits.reshape(-1, 65),
                                                      yt.reshape(-1)).item()}
  logits = model.apply({"params": params}, jnp.asarray(x))
  logp = jax.nn.log_softmax(logits)
  losses["llmjax"] = float(-jnp.take_along_axis(logp, jnp.asarray(y)[..., None], -1).mean())
  for name, loss in losses.items():
    assert abs(loss - math.log(65)) < 0.05, (name, loss)


@pytest.mark.parametrize("attention_impl,scan_layers",
                         [("einsum", True), ("jax", True), ("einsum", False)])
def test_same_weights_give_the_same_logits(models, attention_impl, scan_layers):
  ref, hf, _, _ = models
  model = Transformer(train_vs_torch.llmjax_config(SHAPE, overrides={
      "attention_impl": attention_impl, "scan_layers": scan_layers}))
  _copy_reference_into_hf(ref, hf)
  tokens = np.random.default_rng(0).integers(0, 65, size=(BATCH, SEQ_LEN))
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens))[0].numpy()
    got_hf = hf(input_ids=torch.from_numpy(tokens)).logits.numpy()
  params = _params_from_reference(ref)
  params = params if scan_layers else stack.unstack_layers(params)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  # Logits are O(0.1) at init; compare against their spread, not only absolutely.
  assert np.std(want) > 1e-3
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(got_hf, want, atol=2e-5, rtol=1e-4)


def test_batches_are_reproducible_next_token_pairs():
  data = np.arange(1000, dtype=np.uint8) % 65
  x, y = common.get_batch(data, 4, 8, seed=3, index=7)
  x2, y2 = common.get_batch(data, 4, 8, seed=3, index=7)
  np.testing.assert_array_equal(y, y2)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  assert not np.array_equal(x, common.get_batch(data, 4, 8, seed=3, index=8)[0])


@pytest.mark.parametrize("rules", ["dp", "zero1", "fsdp"])
def test_data_parallel_benchmark_step_trains_like_one_device(rules, monkeypatch):
  """`llmjax@devices=2[@rules=...]` (the batch split over two CPU devices by the library's
  rule set) does the same work as one device: same initial state, same losses and
  parameters; zero1 splits the optimizer state, fsdp the parameters too."""
  stream = (np.arange(4000) * 7 % 65).astype(np.uint8)
  monkeypatch.setattr(common, "char_corpus",
                      lambda vocab_size=65, data_dir=None: common.CharCorpus(stream, stream, 65))
  one = train_vs_torch.LlmjaxImpl(shape=SHAPE, lr=1e-2)
  two = train_vs_torch.LlmjaxImpl(shape=SHAPE, lr=1e-2, devices=2, rules=rules)
  embedding = two.state.params["embed"]["embedding"]
  assert len(embedding.sharding.device_set) == 2
  assert embedding.sharding.is_fully_replicated == (rules != "fsdp")
  moments = [a for a in jax.tree.leaves(two.state.opt_state) if a.shape == embedding.shape]
  assert moments and all(a.sharding.is_fully_replicated == (rules == "dp") for a in moments)
  _, losses_one = one.run(0, 4)
  _, losses_two = two.run(0, 4)
  assert losses_one[-1] < losses_one[0] - 0.01  # it trains, so equal losses mean something
  np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
  # Adam moves a weight by up to lr = 1e-2 per step whatever its gradient's size, so
  # near-zero gradients (summed in another order over two devices) may differ by ~1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               jax.device_get(two.state.params), jax.device_get(one.state.params))


@pytest.mark.parametrize("kind", ["ref", "hf"])
def test_torch_peers_start_from_llmjax_weights_and_follow_its_trajectory(kind, monkeypatch):
  """The race's default: the PyTorch peer loads llmjax's initial weights, after which the
  same batches give the same losses on both sides (to float rounding)."""
  stream = (np.arange(4000) * 11 % 65).astype(np.uint8)
  monkeypatch.setattr(common, "char_corpus",
                      lambda vocab_size=65, data_dir=None: common.CharCorpus(stream, stream, 65))
  ours = train_vs_torch.LlmjaxImpl(shape=SHAPE)
  theirs = train_vs_torch.TorchImpl(kind=kind, shape=SHAPE, threads=1)
  assert abs(theirs.initial_loss - ours.initial_loss) > 1e-3  # different draws before
  loss = theirs.load_gpt2(ours.gpt2_weights())
  np.testing.assert_allclose(loss, ours.initial_loss, atol=1e-5)
  _, losses_ours = ours.run(0, 3)
  _, losses_theirs = theirs.run(0, 3)
  np.testing.assert_allclose(losses_theirs, losses_ours, atol=1e-4)


def test_impl_options_reach_the_worker():
  """`--impls` options after `@`: config overrides, rule set, malloc mode, device count."""
  (worker,) = train_vs_torch.make_workers(
      "llmjax-bf16@devices=2@rules=zero1@host_malloc=system@causal_chunks=2", threads=2,
      shape=SHAPE)
  assert worker.kwargs == {"shape": SHAPE, "dtype": "bfloat16", "devices": 2,
                           "rules": "zero1", "host_malloc": "system",
                           "overrides": {"causal_chunks": 2}}
  assert "--xla_force_host_platform_device_count=2" in worker.env["XLA_FLAGS"]
  with pytest.raises(SystemExit, match="unknown implementation"):
    train_vs_torch.make_workers("llmjax-f16", threads=2, shape=SHAPE)


def test_gpu_runs_put_every_worker_on_the_gpu():
  """`--device gpu`: PyTorch peers get the device and the dtype option; JAX workers
  allocate on demand so that several share the GPU's memory."""
  ours, theirs = train_vs_torch.make_workers(
      "llmjax-bf16@attention_impl=cudnn,torch-ref-compile@dtype=bfloat16", threads=2,
      device="gpu", shape="gpt2-124m")
  assert ours.kwargs == {"shape": "gpt2-124m", "dtype": "bfloat16",
                         "overrides": {"attention_impl": "cudnn"}}
  assert theirs.kwargs == {"shape": "gpt2-124m", "kind": "ref", "compile": True,
                           "device": "gpu", "dtype": "bfloat16"}
  assert all(w.env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for w in (ours, theirs))
  (cpu,) = train_vs_torch.make_workers("torch-ref", threads=2, shape=SHAPE)
  assert "device" not in cpu.kwargs and "XLA_PYTHON_CLIENT_PREALLOCATE" not in cpu.env


def test_gpt2_shape_has_gpt2_vocabulary_and_random_ids():
  cfg = train_vs_torch.llmjax_config("gpt2-124m")
  assert (cfg.vocab_size, cfg.max_len, cfg.num_layers, cfg.embed_dim) == (50257, 1024, 12, 768)
  data = common.corpus(50257)
  assert data.train.max() < 50257 and len(np.unique(data.train[:100_000])) > 40_000
  np.testing.assert_array_equal(data.val, common.random_corpus(50257).val)  # seeded
  info = {"a": {"params": 7, "initial_loss": 10.98}, "b": {"params": 7, "initial_loss": 10.97}}
  train_vs_torch.check_same_work(info, 50257, 0.3)
  with pytest.raises(SystemExit, match="initial losses"):
    train_vs_torch.check_same_work({**info, "c": {"params": 7, "initial_loss": 4.2}}, 50257, 0.3)
