"""DPO / cDPO / IPO: losses against float64 numpy on a real model's logits, log 2 at
policy = reference and the closed form −log σ(βΔ) (β once), response-only sums, packed
pairs score as alone, the reference stays bitwise frozen while the policy learns,
gradient accumulation and 8 devices match one batch on one device, LoRA's 'base'
reference is the frozen base, a precomputed reference gives the online loss, and bad
inputs are UserErrors. The encoder-decoder layout (prompt -> encoder, responses ->
decoder) against float64 numpy from a plain `apply` on rows built here, log 2 at
policy = reference, response-only scoring, a frozen reference, packing, both other
references and layout errors: the `test_encdec_*` tests. Whole runs:
tests/objectives/test_dpo_runs.py."""


import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax.data import packing
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.models import presets
from llmjax.models.transformer import Transformer
from llmjax.objectives import preference
from llmjax.objectives.dpo import DPO, ENCODER_DECODER_KEYS, KEYS
from llmjax.optim.optimizers import OptimizerConfig
from llmjax.peft.lora import LoraConfig
from llmjax.peft.model import PeftModel
from llmjax.sharding import mesh as mesh_lib
from llmjax.sharding import partition
from llmjax.sharding import rules as rules_lib
from llmjax.train import state as state_lib
from llmjax.train import step as step_lib

L = 32
PAIRS = [{"prompt": "Who speaks? ", "chosen": "the king", "rejected": "a fool"},
         {"prompt": "Which play? ", "chosen": "Hamlet", "rejected": "Macbeth, I think"},
         {"prompt": "Next line: ", "chosen": "to be or not", "rejected": "no"},
         {"prompt": "Who? ", "chosen": "Juliet", "rejected": "Romeo and his men"}] * 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [p[k] for p in PAIRS for k in ("prompt", "chosen", "rejected")] * 20
  return tokenizer_lib.train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "char"),
                                       model_type="char", vocab_size=None)


@pytest.fixture(scope="module")
def net(tok):
  cfg = presets.get_preset("tiny", vocab_size=tok.vocab_size, embed_dim=32, num_heads=2,
                           mlp_dim=64, dropout_rate=0.0, max_len=3 * L)  # 3 L: packed rows
  return Transformer(cfg)


def _init(model, seed):
  tokens = jnp.zeros((1, L), jnp.int32)
  return nn.meta.unbox(jax.jit(lambda r: model.init(r, tokens))(jax.random.PRNGKey(seed))
                       ["params"])


@pytest.fixture(scope="module")
def params(net):
  """(policy, reference): two different random models."""
  return _init(net, 0), _init(net, 1)


def _batch(objective, tok, records=PAIRS):
  """One pair per row, padded to L (packing='none')."""
  lengths = {k: L for k in KEYS}
  lengths.update({k: L for k in ("chosen_ref", "rejected_ref")
                  if objective.precomputed_reference})
  rows = [packing.pad_unpacked(objective.feature_fn(r, tok), lengths) for r in records]
  return {k: jnp.asarray(np.stack([row[k] for row in rows])) for k in rows[0]}


_JITTED = {}


def _numpy_seq_logps(logits, tokens, mask, segments):
  """float64: Σ log p(tokens[t+1]) over t with mask[t+1] = 1 in t's segment, per row."""
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  out = np.zeros(len(tokens))
  for b in range(len(tokens)):
    for t in range(tokens.shape[1] - 1):
      if segments[b, t] > 0 and segments[b, t + 1] == segments[b, t] and mask[b, t + 1]:
        out[b] += logp[b, t, tokens[b, t + 1]]
  return out, mask[:, 1:].sum(1)


def _numpy_loss(net, policy, ref, batch, obj):
  """The DPO / cDPO / IPO loss and reward accuracy of `batch` in float64 numpy."""
  apply, logps = _JITTED.setdefault(net, jax.jit(net.apply)), {}
  for name, p in (("pi", policy), ("ref", ref)):
    for side in ("chosen", "rejected"):
      tokens, seg = np.asarray(batch[f"{side}_tokens"]), np.asarray(
          batch[f"{side}_tokens_segment_ids"])
      logits = apply({"params": p}, batch[f"{side}_tokens"], segment_ids=seg)
      sums, counts = _numpy_seq_logps(logits, tokens, np.asarray(batch[f"{side}_mask"]), seg)
      logps[name, side] = sums / counts if obj.length_normalize else sums
      if (name, side) == ("pi", "chosen"):
        nll_chosen = -sums / counts
  delta = ((logps["pi", "chosen"] - logps["ref", "chosen"])
           - (logps["pi", "rejected"] - logps["ref", "rejected"]))
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  if obj.loss == "ipo":
    loss = (delta - 1 / (2 * obj.beta)) ** 2
  else:
    eps = obj.label_smoothing
    loss = -(1 - eps) * log_sigmoid(obj.beta * delta) - eps * log_sigmoid(-obj.beta * delta)
  loss = loss + obj.rpo_alpha * nll_chosen  # RPO: the chosen response's per-token NLL
  return loss.mean(), np.mean(delta > 0)


@pytest.mark.parametrize("obj", [
    DPO(beta=0.1, max_len=L), DPO(beta=0.5, label_smoothing=0.2, max_len=L),
    DPO(beta=0.1, loss="ipo", max_len=L), DPO(beta=0.3, loss="ipo", length_normalize=True,
                                              max_len=L),
    DPO(beta=0.1, max_len=L, rpo_alpha=0.7),
    DPO(beta=0.1, max_len=L, rpo_alpha=1.0, length_normalize=True)],
    ids=["dpo", "cdpo", "ipo", "ipo_mean", "rpo", "rpo_mean"])
def test_loss_matches_float64_numpy(obj, tok, net, params):
  batch = _batch(obj, tok)
  sums = obj.loss_sums(net, params[0], batch, frozen={"reference": params[1]})
  got = obj.summarize(sums)
  want_loss, want_acc = _numpy_loss(net, *params, batch, obj)
  assert float(sums["weight"]) == len(PAIRS)
  np.testing.assert_allclose(float(got["loss"]), want_loss, rtol=2e-5)
  assert float(got["reward_accuracy"]) == want_acc


def test_per_pair_losses_match_numpy_on_random_deltas():
  rng = np.random.default_rng(0)
  delta = rng.normal(scale=5.0, size=1000)
  for beta, eps in ((0.1, 0.0), (0.5, 0.1), (2.0, 0.3)):
    x = beta * delta
    want = (1 - eps) * np.logaddexp(0, -x) + eps * np.logaddexp(0, x)
    np.testing.assert_allclose(preference.preference_loss(jnp.asarray(delta), beta, "sigmoid",
                                                          eps), want, rtol=1e-5)
    np.testing.assert_allclose(preference.preference_loss(jnp.asarray(delta), beta, "ipo"),
                               (delta - 1 / (2 * beta)) ** 2, rtol=1e-5, atol=1e-5)


def test_loss_is_log_2_when_policy_is_reference(tok, net, params):
  obj = DPO(beta=0.1, max_len=L)
  got = obj.summarize(obj.loss_sums(net, params[0], _batch(obj, tok),
                                    frozen=obj.frozen_trees(params[0])))
  np.testing.assert_allclose(float(got["loss"]), np.log(2.0), rtol=1e-6)
  assert float(got["reward_margin"]) == 0 and float(got["reward_accuracy"]) == 0


def test_planted_delta_gives_the_closed_form_with_beta_once(tok, net, params, tmp_path):
  """The reference planted (a precomputed table) so that Δ = 3 for every pair:
  loss = −log σ(3β), not −log σ(3β²) (the β-twice bug) nor log 2."""
  online = DPO(beta=0.5, max_len=L)
  logps = preference.sequence_logps(net, params[0], _batch(online, tok))
  table = {}
  for i, record in enumerate(PAIRS):
    pi_c, pi_r = (float(logps[s][0][i, 0]) for s in ("chosen", "rejected"))
    table[preference.pair_key(record)] = [pi_c - 1.0, pi_r + 2.0]  # Δ = 1 − (−2) = 3
  path = preference.write_table(str(tmp_path / "ref.json"), table, {
      "max_len": L, "tokenizer": preference.tokenizer_fingerprint(tok)})
  obj = DPO(beta=0.5, max_len=L, precomputed_reference=path)
  got = obj.summarize(obj.loss_sums(net, params[0], _batch(obj, tok)))
  np.testing.assert_allclose(float(got["loss"]), np.logaddexp(0, -1.5), rtol=1e-5)
  np.testing.assert_allclose(float(got["reward_margin"]), 1.5, rtol=1e-5)
  assert float(got["reward_accuracy"]) == 1.0


class _Logits:
  """A 'model' whose logits are its parameters: to see which positions are read."""
  config = presets.get_preset("tiny")

  @staticmethod
  def apply(variables, tokens, **kwargs):
    return variables["params"]


def test_sums_read_response_positions_only(tok):
  obj = DPO(max_len=L)
  batch = _batch(obj, tok, PAIRS[:2])
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, L, tok.vocab_size)),
                       jnp.float32)  # [chosen; rejected]
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])  # [4, L]
  scored = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], 1) > 0  # predicts t+1
  total = lambda lg: sum(v[0].sum() for v in preference.sequence_logps(
      _Logits, lg, batch).values())
  garbage = jnp.where(scored[..., None], logits, 100.0 * logits)  # prompt, padding changed
  np.testing.assert_allclose(total(garbage), total(logits), rtol=1e-6)
  grads = jax.grad(total)(logits)
  assert float(jnp.abs(jnp.where(scored[..., None], 0.0, grads)).max()) == 0.0
  assert float(jnp.abs(grads).sum()) > 0


def test_packed_pairs_score_as_they_do_alone(tok, net, params):
  obj = DPO(beta=0.1, max_len=L)
  features = [obj.feature_fn(r, tok) for r in PAIRS[:3]]
  ds = grain.MapDataset.source(features).to_iter_dataset()
  rows = list(packing.pack(ds, {k: 3 * L for k in KEYS}, "first_fit", shuffle_bins=False))
  assert len(rows) == 1 and rows[0]["chosen_tokens_segment_ids"].max() == 3
  packed = {k: jnp.asarray(v)[None] for k, v in rows[0].items()}
  frozen = {"reference": params[1]}
  alone = obj.loss_sums(net, params[0], _batch(obj, tok, PAIRS[:3]), frozen=frozen)
  together = obj.loss_sums(net, params[0], packed, frozen=frozen)
  for key in alone:
    np.testing.assert_allclose(float(together[key]), float(alone[key]), rtol=1e-5, atol=1e-5)


def _state(model, obj, policy, tx):
  """A TrainState on a copy of `policy` (the steps donate it)."""
  policy = jax.tree.map(jnp.copy, policy)
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=policy,
                              opt_state=tx.init(policy), rng=jax.random.key_data(
                                  jax.random.PRNGKey(0)), frozen=obj.frozen_trees(policy))


def test_reference_stays_bitwise_frozen_while_the_policy_learns(tok, net, params):
  obj = DPO(beta=0.5, max_len=L)
  tx, schedule = OptimizerConfig(peak_lr=3e-3, warmup_steps=0).make(20)
  state = _state(net, obj, params[0], tx)
  start = jax.tree.map(np.array, params[0])
  step = jax.jit(step_lib.make_train_step(net, obj, tx, schedule), donate_argnums=0)
  batch, history = _batch(obj, tok), []
  for _ in range(12):
    state, metrics = step(state, batch)
    history.append((float(metrics["loss"]), float(metrics["reward_accuracy"])))
  for a, b in zip(jax.tree.leaves(state.frozen["reference"]), jax.tree.leaves(start)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                       jax.tree.leaves(start)))
  np.testing.assert_allclose(history[0][0], np.log(2.0), rtol=1e-5)
  assert history[-1][0] < history[0][0] - 0.1 and history[-1][1] > 0.5, history


def test_grad_accumulation_1x8_equals_8x1(tok, net, params):
  """Per-device batch 1 x 8 accumulation steps gives the update of batch 8 x 1 step
  (TRL's invariant test): the loss is a sum over pairs divided once by their number."""
  obj = DPO(beta=0.5, max_len=L)
  tx, schedule = OptimizerConfig(peak_lr=1e-2, warmup_steps=0, eps=1e-3).make(10)
  batch = _batch(obj, tok)
  states, metrics = [], []
  for accum in (1, 8):
    step = jax.jit(step_lib.make_train_step(net, obj, tx, schedule, grad_accum_steps=accum))
    state, m = step(_state(net, obj, params[0], tx).replace(
        frozen={"reference": params[1]}), batch)
    states.append(state)
    metrics.append(m)
  for key in ("loss", "grad_norm", "reward_accuracy", "reward_margin"):
    np.testing.assert_allclose(metrics[0][key], metrics[1][key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _sharded_run(net, obj, batch, mesh, rule_set, steps=3):
  """`steps` train steps with the loop's sharded state, frozen trees and donation."""
  tx, schedule = OptimizerConfig(peak_lr=1e-2, warmup_steps=0, eps=1e-3).make(10)
  tokens = jnp.zeros((1, L), jnp.int32)
  state, shardings = state_lib.init_train_state(
      lambda rng: net.init({"params": rng}, tokens)["params"], tx, mesh, rule_set, 0,
      obj.frozen_trees)
  rules = rules_lib.get_rules(rule_set)
  batch_sharding = partition.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(step_lib.make_train_step(net, obj, tx, schedule),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)
    losses = []
    for _ in range(steps):
      state, metrics = step(state, partition.global_batch(jax.device_get(batch),
                                                          batch_sharding))
      losses.append(float(metrics["loss"]))
  return losses, state


_ONE_DEVICE = {}


@pytest.mark.slow
@pytest.mark.parametrize("rule_set, shape", [("dp", (8, 1, 1)), ("fsdp_tp", (2, 2, 2))])
def test_eight_devices_match_one(rule_set, shape, tok, net):
  obj = DPO(beta=0.5, max_len=L)
  batch = _batch(obj, tok)
  if "run" not in _ONE_DEVICE:
    _ONE_DEVICE["run"] = _sharded_run(
        net, obj, batch, mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]), "dp")
  one = _ONE_DEVICE["run"]
  eight = _sharded_run(net, obj, batch, mesh_lib.make_mesh(*shape), rule_set)
  np.testing.assert_allclose(one[0][0], np.log(2.0), rtol=1e-6)  # reference = init
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(eight[1].params), jax.tree.leaves(one[1].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
  specs = lambda tree: [x.sharding.spec for x in jax.tree.leaves(tree)]
  assert specs(eight[1].frozen["reference"]) == specs(eight[1].params)


def test_lora_base_reference_is_the_frozen_base(tok, net, params):
  """reference='base' (the adapters switched off, no second copy) gives the loss and
  gradients of reference='frozen' holding the base weights."""
  lora = PeftModel(net, [LoraConfig(target="attention", rank=2)])
  tuned = nn.meta.unbox(lora.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))
                        ["params"])
  tuned = jax.tree_util.tree_map_with_path(  # a trained-looking adapter: B != 0
      lambda p, x: x + 0.3 if "lora_b" in jax.tree_util.keystr(p) else x, tuned)
  base = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(p) else x, tuned)
  batch = _batch(DPO(max_len=L), tok, PAIRS[:4])
  results = []
  for obj, frozen in ((DPO(reference="base", max_len=L), {}),
                      (DPO(reference="frozen", max_len=L), {"reference": base})):
    assert obj.frozen_trees(tuned).keys() == frozen.keys()
    loss = lambda p, obj=obj, frozen=frozen: obj.loss_sums(lora, p, batch, frozen=frozen)["loss"]
    results.append(jax.jit(jax.value_and_grad(loss))(tuned))
  assert abs(float(results[0][0]) - 4 * np.log(2.0)) > 1e-3  # not trivially equal
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  with pytest.raises(UserError, match="no.*adapters|has none"):
    DPO(reference="base", max_len=L).loss_sums(net, params[0], batch)


def test_precomputed_reference_gives_the_online_loss(tok, net, params, tmp_path):
  online = DPO(beta=0.2, max_len=L)
  table = online.reference_table(net, params[1], PAIRS[:5], tok, batch_size=4)  # 2 calls
  assert len(table) == 4  # PAIRS repeats: 4 distinct pairs
  path = preference.write_table(str(tmp_path / "ref.json"), table, {
      "max_len": L, "tokenizer": preference.tokenizer_fingerprint(tok)})
  cached = DPO(beta=0.2, max_len=L, precomputed_reference=path)
  assert cached.frozen_trees(params[0]) == {}  # no reference held
  want = online.loss_sums(net, params[0], _batch(online, tok), frozen={"reference": params[1]})
  got = cached.loss_sums(net, params[0], _batch(cached, tok))
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)


def test_bad_configs_and_inputs_are_user_errors(tok, params):
  for kwargs, match in (({"loss": "hinge"}, "DPO.loss"), ({"reference": "ema"}, "reference"),
                        ({"beta": 0.0}, "beta"), ({"label_smoothing": 0.5}, "label_smooth"),
                        ({"loss": "ipo", "label_smoothing": 0.1}, "IPO has no"),
                        ({"precomputed_reference": "t.json"}, "needs DPO.max_len"),
                        ({"rpo_alpha": -1.0}, "rpo_alpha=-1.0 must be >= 0")):
    with pytest.raises(UserError, match=match):
      DPO(**kwargs)
  obj = DPO(max_len=L)
  with pytest.raises(UserError, match="'prompt', 'chosen' and 'rejected'"):
    obj.feature_fn({"prompt": "a", "response": "b"}, tok)
  with pytest.raises(UserError, match="empty rejected"):
    obj.feature_fn({"prompt": "a", "chosen": "b", "rejected": " "}, tok)
  with pytest.raises(UserError, match="feature_lengths"):
    obj.init_inputs({"tokens": L, "response_mask": L})
  with pytest.raises(UserError, match="longer than the rows"):
    DPO(max_len=2 * L).init_inputs({k: L for k in KEYS})
  encoder = Transformer(presets.get_preset("bert-tiny", vocab_size=tok.vocab_size))
  with pytest.raises(UserError, match="decoder-only"):
    obj.loss_sums(encoder, params[0], _batch(obj, tok))


def test_max_len_keeps_one_prompt_for_both_responses(tok):
  record = {"prompt": "Which play is it from, tell me? ", "chosen": "Hamlet",
            "rejected": "Macbeth, I think"}
  rows = DPO(max_len=24).feature_fn(record, tok)
  chosen, rejected = (rows[f"{s}_tokens"] for s in ("chosen", "rejected"))
  longer = len(tok.encode(record["rejected"])) + 1  # + EOS
  assert len(rejected) == 24 and rows["rejected_mask"].sum() == longer
  kept = 24 - 1 - longer  # the row, less BOS and the longer response
  for side, tokens in (("chosen", chosen), ("rejected", rejected)):  # the same prompt's end
    np.testing.assert_array_equal(tokens[1:1 + kept], tok.encode(record["prompt"])[-kept:])
    assert rows[f"{side}_mask"][:1 + kept].sum() == 0


def test_precomputed_table_must_match_tokenizer_length_and_pairs(tok, tmp_path):
  path = preference.write_table(str(tmp_path / "ref.json"), {}, {"max_len": L, "tokenizer":
                                                                 "another"})
  with pytest.raises(UserError, match="another tokenizer"):
    DPO(max_len=L, precomputed_reference=path).feature_fn(PAIRS[0], tok)
  path = preference.write_table(path, {}, {"max_len": L + 1})
  with pytest.raises(UserError, match="max_len"):
    DPO(max_len=L, precomputed_reference=path).feature_fn(PAIRS[0], tok)
  path = preference.write_table(path, {}, {"max_len": L})
  with pytest.raises(UserError, match="not in the reference table"):
    DPO(max_len=L, precomputed_reference=path).feature_fn(PAIRS[0], tok)
  with pytest.raises(UserError, match="does not exist"):
    DPO(max_len=L, precomputed_reference=str(tmp_path / "no.json")).feature_fn(PAIRS[0], tok)


# --- encoder-decoder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def encdec(tok):
  """(t5-tiny model, policy params, reference params): two different random models."""
  cfg = presets.get_preset("t5-tiny", vocab_size=tok.vocab_size, embed_dim=32, num_heads=2,
                           mlp_dim=64, dropout_rate=0.0, max_len=3 * L)
  model = Transformer(cfg)
  tokens = jnp.zeros((1, L), jnp.int32)
  init = jax.jit(lambda r: model.init(r, tokens, encoder_tokens=tokens))
  return model, *(nn.meta.unbox(init(jax.random.PRNGKey(s))["params"]) for s in (0, 1))


def _encdec_batch(objective, tok, records=PAIRS):
  """One pair per row in the encoder-decoder layout, padded to L (packing='none')."""
  keys = ENCODER_DECODER_KEYS + (("chosen_ref", "rejected_ref")
                                 if objective.precomputed_reference else ())
  rows = [packing.pad_unpacked(objective.feature_fn(r, tok), {k: L for k in keys})
          for r in records]
  return {k: jnp.asarray(np.stack([row[k] for row in rows])) for k in rows[0]}


def _padded(rows):
  """Rows of ids -> (ids [B, L], 1 on real tokens [B, L]), zero-padded."""
  ids, real = np.zeros((len(rows), L), np.int32), np.zeros((len(rows), L), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)], real[i, :len(row)] = row, 1
  return ids, real


def _numpy_encdec_logps(model, params, tok, records):
  """float64 `{side: (log π(y|x) per record, response tokens + EOS)}`, the rows built
  here from the text (not by DPO): encoder tok(prompt) + [eos], decoder [bos] +
  tok(y) + [eos]; log p of y's tokens and EOS from a plain apply + log_softmax."""
  inputs, inputs_real = _padded([tok.encode(r["prompt"]) + [tok.eos_id] for r in records])
  out = {}
  for side in ("chosen", "rejected"):
    targets = [tok.encode(r[side]) + [tok.eos_id] for r in records]
    decoder, real = _padded([[tokenizer_lib.BOS_ID] + t for t in targets])
    logits = _JITTED.setdefault(model, jax.jit(model.apply))(
        {"params": params}, decoder, segment_ids=real, encoder_tokens=inputs,
        encoder_segment_ids=inputs_real)
    logits = np.asarray(logits, np.float64)  # [B, L, V]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    out[side] = (np.array([sum(logp[b, t, y] for t, y in enumerate(ys))  # t predicts t+1
                           for b, ys in enumerate(targets)]),
                 np.array([len(ys) for ys in targets]))
  return out


@pytest.mark.parametrize("obj", [
    DPO(beta=0.1, max_len=L), DPO(beta=0.5, label_smoothing=0.2, max_len=L),
    DPO(beta=0.1, loss="ipo", max_len=L), DPO(beta=0.3, loss="ipo", length_normalize=True,
                                              max_len=L),
    DPO(beta=0.1, max_len=L, rpo_alpha=0.7),
    DPO(beta=0.1, max_len=L, rpo_alpha=1.0, length_normalize=True)],
    ids=["dpo", "cdpo", "ipo", "ipo_mean", "rpo", "rpo_mean"])
def test_encdec_loss_matches_float64_numpy(obj, tok, encdec):
  model, policy, ref = encdec
  pi, pi_ref = (_numpy_encdec_logps(model, p, tok, PAIRS) for p in (policy, ref))
  logps = {}
  for side in ("chosen", "rejected"):
    (sums, n), (ref_sums, _) = pi[side], pi_ref[side]
    logps[side] = (sums - ref_sums) / (n if obj.length_normalize else 1)
  delta = logps["chosen"] - logps["rejected"]
  if obj.loss == "ipo":
    want = (delta - 1 / (2 * obj.beta)) ** 2
  else:
    eps, x = obj.label_smoothing, obj.beta * delta
    want = (1 - eps) * np.logaddexp(0, -x) + eps * np.logaddexp(0, x)
  want = want + obj.rpo_alpha * -pi["chosen"][0] / pi["chosen"][1]  # RPO's chosen NLL
  sums = obj.loss_sums(model, policy, _encdec_batch(obj, tok), frozen={"reference": ref})
  got = obj.summarize(sums)
  assert float(sums["weight"]) == len(PAIRS)
  np.testing.assert_allclose(float(got["loss"]), want.mean(), rtol=2e-5)
  sums_c, n_c = pi["chosen"]
  np.testing.assert_allclose(float(got["logps_chosen"]), np.mean(
      sums_c / n_c if obj.length_normalize else sums_c), rtol=1e-5)
  assert float(got["reward_accuracy"]) == np.mean(delta > 0)


def test_encdec_loss_is_log_2_when_policy_is_reference(tok, encdec):
  model, policy, _ = encdec
  obj = DPO(beta=0.1, max_len=L)
  got = obj.summarize(obj.loss_sums(model, policy, _encdec_batch(obj, tok),
                                    frozen=obj.frozen_trees(policy)))
  np.testing.assert_allclose(float(got["loss"]), np.log(2.0), rtol=1e-6)
  assert float(got["reward_margin"]) == 0 and float(got["logps_chosen"]) < 0


def test_encdec_scores_response_tokens_only(tok, encdec):
  """The prompt is conditioned on, never scored: the counts are the responses' (+ EOS)
  whatever the prompt; a real prompt token changes the sums (the encoder is read) and
  encoder padding does not; a decoder token whose target is outside the mask changes
  nothing, and the same token inside the mask does."""
  model, policy, _ = encdec
  obj = DPO(max_len=L)
  records = [dict(PAIRS[0], prompt=p) for p in ("Who? ", "Who speaks in this scene, say? ")]
  batch = _encdec_batch(obj, tok, records)
  logps = lambda b: {s: np.asarray(v[0][:, 0]) for s, v in
                     preference.sequence_logps(model, policy, b).items()}
  base = logps(batch)
  counts = preference.sequence_logps(model, policy, batch)["chosen"][1][:, 0]
  np.testing.assert_array_equal(counts, [len(tok.encode("the king")) + 1] * 2)
  assert not np.allclose(base["chosen"][0], base["chosen"][1])  # another prompt: another p
  inputs = np.array(batch["inputs"])
  n = int(batch["inputs_segment_ids"][0].sum())
  padded = inputs.copy()
  other = tok.encode("k")[-1]  # a real character, in none of the replaced places
  padded[0, n:] = other        # encoder padding
  prompt = inputs.copy()
  assert inputs[0, 1] != other
  prompt[0, 1] = other         # a real prompt token
  for changed, moves in ((padded, False), (prompt, True)):
    got = logps({**batch, "inputs": jnp.asarray(changed)})
    assert np.allclose(got["chosen"][0], base["chosen"][0], rtol=1e-6) != moves
    np.testing.assert_allclose(got["chosen"][1], base["chosen"][1], rtol=1e-6)  # other row
  # The EOS is the last real token, conditioning nothing: out of the mask it is not read.
  eos = int(batch["chosen_response_segment_ids"][0].sum()) - 1
  tokens = np.array(batch["chosen_response"])
  tokens[0, eos] = other
  mask = np.array(batch["chosen_response_mask"])
  mask[0, eos] = 0
  for mask_eos, moves in ((batch["chosen_response_mask"], True), (mask, False)):
    unchanged = logps({**batch, "chosen_response_mask": jnp.asarray(mask_eos)})["chosen"][0]
    swapped = logps({**batch, "chosen_response": jnp.asarray(tokens),
                     "chosen_response_mask": jnp.asarray(mask_eos)})["chosen"][0]
    assert (abs(swapped - unchanged) > 1e-4) == moves
  assert unchanged > base["chosen"][0]  # one term fewer (a log-prob < 0)


def test_encdec_reference_stays_bitwise_frozen_while_the_policy_learns(tok, encdec):
  model, policy, _ = encdec
  obj = DPO(beta=0.5, max_len=L)
  tx, schedule = OptimizerConfig(peak_lr=3e-3, warmup_steps=0).make(20)
  state = _state(model, obj, policy, tx)
  start = jax.tree.map(np.array, policy)
  step = jax.jit(step_lib.make_train_step(model, obj, tx, schedule), donate_argnums=0)
  batch, losses = _encdec_batch(obj, tok), []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(state.frozen["reference"]), jax.tree.leaves(start)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                       jax.tree.leaves(start)))
  np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-5)
  assert losses[-1] < losses[0] and all(np.isfinite(losses)), losses


def test_encdec_packed_pairs_and_precomputed_reference_match(tok, encdec, tmp_path):
  """Three pairs packed into one row (encoder segment s <-> decoder segment s) score as
  alone, and a reference table written in one pass gives the online loss."""
  model, policy, ref = encdec
  online = DPO(beta=0.2, max_len=L)
  table = online.reference_table(model, ref, PAIRS[:5], tok, batch_size=4)
  path = preference.write_table(str(tmp_path / "ref.json"), table, {
      "max_len": L, "tokenizer": preference.tokenizer_fingerprint(tok),
      "arch": "encoder_decoder"})
  cached = DPO(beta=0.2, max_len=L, precomputed_reference=path)
  keys = ENCODER_DECODER_KEYS + ("chosen_ref", "rejected_ref")
  ds = grain.MapDataset.source([cached.feature_fn(r, tok) for r in PAIRS[:3]])
  rows = list(packing.pack(ds.to_iter_dataset(), {k: 3 * L for k in keys}, "first_fit",
                           shuffle_bins=False))
  assert len(rows) == 1 and rows[0]["inputs_segment_ids"].max() == 3
  packed = {k: jnp.asarray(v)[None] for k, v in rows[0].items()}
  want = online.loss_sums(model, policy, _encdec_batch(online, tok, PAIRS[:3]),
                          frozen={"reference": ref})
  for got in (online.loss_sums(model, policy, packed, frozen={"reference": ref}),
              cached.loss_sums(model, policy, packed),
              cached.loss_sums(model, policy, _encdec_batch(cached, tok, PAIRS[:3]))):
    for key in want:
      np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, atol=1e-5,
                                 err_msg=key)
  assert cached.init_inputs({k: L for k in keys})["encoder_tokens"].shape == (1, L)
  with pytest.raises(UserError, match="encoder_decoder model"):
    cached.init_inputs({k: L for k in KEYS + ("chosen_ref", "rejected_ref")})


def test_encdec_lora_base_reference_is_the_frozen_base(tok, encdec):
  model, _, _ = encdec
  lora = PeftModel(model, [LoraConfig(target="attention", rank=2)])
  tokens = jnp.zeros((1, L), jnp.int32)
  tuned = nn.meta.unbox(lora.init(jax.random.PRNGKey(0), tokens, encoder_tokens=tokens)
                        ["params"])
  tuned = jax.tree_util.tree_map_with_path(  # a trained-looking adapter: B != 0
      lambda p, x: x + 0.3 if "lora_b" in jax.tree_util.keystr(p) else x, tuned)
  base = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(p) else x, tuned)
  batch = _encdec_batch(DPO(max_len=L), tok, PAIRS[:4])
  results = []
  for obj, frozen in ((DPO(reference="base", max_len=L), {}),
                      (DPO(reference="frozen", max_len=L), {"reference": base})):
    loss = lambda p, obj=obj, frozen=frozen: obj.loss_sums(lora, p, batch, frozen=frozen)["loss"]
    results.append(jax.jit(jax.value_and_grad(loss))(tuned))
  assert abs(float(results[0][0]) - 4 * np.log(2.0)) > 1e-3  # not trivially equal
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_encdec_rows_and_layout_errors(tok, net, params, encdec):
  record = {"prompt": "Which play is it from, tell me? ", "chosen": "Hamlet",
            "rejected": "Macbeth, I think"}
  rows = DPO(max_len=12).feature_fn(record, tok)
  prompt, rejected = tok.encode(record["prompt"]), tok.encode(record["rejected"])
  np.testing.assert_array_equal(rows["inputs"], prompt[-11:] + [tok.eos_id])
  np.testing.assert_array_equal(rows["rejected_response"], [tokenizer_lib.BOS_ID] +
                                rejected[:11])  # cut at its end
  np.testing.assert_array_equal(rows["chosen_response_mask"],
                                [0] + [1] * (len(tok.encode("Hamlet")) + 1))
  obj = DPO(max_len=L)
  lengths = {k: L for k in ENCODER_DECODER_KEYS}
  assert obj.init_inputs(lengths)["tokens"].shape == (1, L)
  for bad in ({**lengths, "chosen_response_mask": L - 1}, {**lengths, "chosen_mask": L}):
    with pytest.raises(UserError, match="encoder-decoder"):
      obj.init_inputs(bad)
  with pytest.raises(UserError, match="longer than the rows"):
    obj.init_inputs({**lengths, "inputs": L // 2})
  model, policy, _ = encdec
  with pytest.raises(UserError, match="model is encoder_decoder.*'inputs': S"):
    obj.loss_sums(model, policy, _batch(obj, tok), frozen={"reference": policy})
  with pytest.raises(UserError, match="model is decoder_only.*'chosen_tokens'"):
    obj.loss_sums(net, params[0], _encdec_batch(obj, tok), frozen={"reference": params[0]})
