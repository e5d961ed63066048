"""SFT: the loss is a cross-entropy over response tokens only (against numpy), prompt
positions carry no weight, packed examples score as they do alone, the prompt/response
boundary is exact under a subword tokenizer, and a debug run from a trained checkpoint
learns."""

import os
import shutil

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import cli
from llmjax.data import packing
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.errors import UserError
from llmjax.models import presets
from llmjax.models.transformer import Transformer
from llmjax.objectives import seq2seq, sft
from llmjax.train import metrics as metrics_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures", "a5996b6_tiny_run")
PROMPT, RESPONSE = "Who speaks this line?\nAnswer: ", "the king"
EXAMPLES = [{"prompt": PROMPT, "response": RESPONSE},
            {"prompt": "Answer: ", "response": "the queen speaks"}]
L = 64


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """A small whitespace-exact BPE: it merges ' ' + 'the' into '▁the' across the boundary."""
  texts = [f"{PROMPT}{RESPONSE}", "the king and the queen speak", "Answer: the queen"] * 50
  texts.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ?:.,!'\n")
  return tokenizer_lib.train_tokenizer(
      texts, str(tmp_path_factory.mktemp("tok") / "bpe"), model_type="bpe", vocab_size=80,
      num_sentinels=0, whitespace_exact=True)


def _model(vocab_size, arch="decoder_only"):
  preset = {"decoder_only": "tiny", "encoder_decoder": "t5-tiny", "encoder_only": "bert-tiny"}
  cfg = presets.get_preset(preset[arch], vocab_size=vocab_size, embed_dim=32, num_heads=2,
                           mlp_dim=64, dropout_rate=0.0)
  return Transformer(cfg)


def _init(model, objective, lengths):
  inputs = objective.init_inputs(lengths)
  variables = jax.jit(lambda rng: model.init(rng, **inputs))(jax.random.PRNGKey(0))
  return flax.linen.meta.unbox(variables["params"])


def _packed_row(features, length=L):
  """Packs feature dicts into one row with the real pipeline packer."""
  lengths = {"tokens": length, "response_mask": length}
  ds = grain.MapDataset.source(features).to_iter_dataset()
  rows = list(packing.pack(ds, lengths, "first_fit", shuffle_bins=False))
  assert len(rows) == 1
  return {k: np.asarray(v)[None] for k, v in rows[0].items()}


def _numpy_loss(logits, batch):
  """-log p(token t+1 | ..t) summed over t where t+1 is a response token of t's example."""
  logits = np.asarray(logits, np.float64)[0]
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # log-softmax
  tokens, seg, mask = (batch[k][0] for k in ("tokens", "tokens_segment_ids", "response_mask"))
  total, count = 0.0, 0
  for t in range(len(tokens) - 1):
    if seg[t] > 0 and seg[t + 1] == seg[t] and mask[t + 1]:
      total -= logp[t, tokens[t + 1]]
      count += 1
  return total, count


def test_boundary_is_exact_where_the_tokenizer_merges_across_it(tok):
  prompt, response = tok.encode(PROMPT), tok.encode(RESPONSE)
  joint = tok.encode(PROMPT + RESPONSE)
  pieces = lambda ids: [tok.id_to_piece(i) for i in ids]
  # The joint encoding merges the prompt's last space into the response: '▁the'.
  assert prompt + response != joint
  assert pieces(prompt)[-1] == "\u2581" and pieces(response)[0] == "the"
  assert "\u2581the" in pieces(joint[len(prompt) - 1:])
  # So slicing the joint encoding at len(tok(prompt)) (the TRL bug class) loses 'the'.
  assert tok.decode(joint[len(prompt):]) != RESPONSE
  f = sft.SFT().feature_fn({"prompt": PROMPT, "response": RESPONSE}, tok)
  tokens, mask = f["tokens"], f["response_mask"]
  start = 1 + len(prompt)  # after bos and the prompt
  assert tokens[0] == tok.bos_id and list(tokens[1:start]) == prompt
  assert mask[:start].sum() == 0 and mask[start:].all()  # the mask starts at 'the'
  assert tok.id_to_piece(int(tokens[start])) == "the" and tokens[-1] == tok.eos_id
  assert tok.decode(tokens[start:-1]) == RESPONSE


def test_loss_is_numpy_cross_entropy_over_response_tokens(tok):
  objective = sft.SFT()
  model = _model(tok.vocab_size)
  params = _init(model, objective, {"tokens": L, "response_mask": L})
  batch = _packed_row([objective.feature_fn(e, tok) for e in EXAMPLES])
  seg = batch["tokens_segment_ids"]
  np.testing.assert_array_equal(seg, batch["response_mask_segment_ids"])
  sums = jax.jit(lambda p, b: objective.loss_sums(model, p, b))(params, batch)
  logits = jax.jit(model.apply)({"params": params}, batch["tokens"], segment_ids=seg,
                                positions=batch["tokens_positions"])
  want, count = _numpy_loss(logits, batch)
  expected_count = sum(len(tok.encode(e["response"])) + 1 for e in EXAMPLES)  # + eos each
  assert count == expected_count == int(sums["weight"])
  np.testing.assert_allclose(float(sums["loss"]), want, rtol=1e-5)
  summary = objective.summarize(sums)
  assert summary["tokens"] == expected_count and 0 <= summary["accuracy"] <= 1


def test_prompt_positions_get_no_gradient(tok):
  """With logits as the parameters, the gradient is zero exactly where the next token is
  a prompt token (or in another example, or padding), and changing a prompt token,
  which is only ever a target there, leaves the loss as it was."""
  objective = sft.SFT()
  batch = _packed_row([objective.feature_fn(e, tok) for e in EXAMPLES])

  class Logits:  # a "model" whose output is its parameters
    config = presets.get_preset("tiny")

    @staticmethod
    def apply(variables, tokens, **kwargs):
      return variables["params"]

  logits = jax.random.normal(jax.random.PRNGKey(1), (1, L, tok.vocab_size))
  loss = lambda lg, b: objective.loss_sums(Logits, lg, b)["loss"]
  grad = np.abs(np.asarray(jax.grad(loss)(logits, batch))).sum(-1)[0]
  seg, mask = batch["tokens_segment_ids"][0], batch["response_mask"][0]
  trained = np.zeros(L, bool)
  trained[:-1] = (mask[1:] == 1) & (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
  assert (grad[~trained] == 0).all() and (grad[trained] > 0).all()
  prompt_at = np.flatnonzero((mask == 0) & (seg > 0) & (np.arange(L) > 0))
  changed = {k: v.copy() for k, v in batch.items()}
  changed["tokens"][0, prompt_at] = (changed["tokens"][0, prompt_at] + 7) % tok.vocab_size
  assert float(loss(logits, changed)) == float(loss(logits, batch))


def test_packed_examples_score_as_they_do_alone(tok):
  objective = sft.SFT()
  model = _model(tok.vocab_size)
  params = _init(model, objective, {"tokens": L, "response_mask": L})
  features = [objective.feature_fn(e, tok) for e in EXAMPLES]
  packed = _packed_row(features)
  loss_sums = jax.jit(lambda p, b: objective.loss_sums(model, p, b))
  for k, f in enumerate(features, start=1):
    alone = loss_sums(params, _packed_row([f]))
    mine = dict(packed, response_mask=packed["response_mask"] * (
        packed["tokens_segment_ids"] == k))
    in_row = loss_sums(params, mine)
    assert float(in_row["weight"]) == float(alone["weight"]) > 0
    np.testing.assert_allclose(float(in_row["loss"]), float(alone["loss"]), rtol=1e-5)


@pytest.mark.parametrize("mode", packing.PACKING_MODES)
def test_every_packing_mode_gives_the_mask_the_tokens_segments(tok, mode):
  features = [sft.SFT().feature_fn(e, tok) for e in EXAMPLES * 3]
  ds = grain.MapDataset.source(features).to_iter_dataset()
  rows = list(packing.pack(ds, {"tokens": 32, "response_mask": 32}, mode, shuffle_bins=False))
  assert rows and all("inputs" not in row for row in rows)  # only the packed pair
  for row in rows:
    np.testing.assert_array_equal(row["tokens_segment_ids"], row["response_mask_segment_ids"])
    np.testing.assert_array_equal(row["tokens_positions"], row["response_mask_positions"])


def test_max_len_drops_the_prompt_start_and_keeps_the_response(tok):
  example = {"prompt": PROMPT * 4, "response": RESPONSE}
  f = sft.SFT(max_len=16).feature_fn(example, tok)
  response = tok.encode(RESPONSE) + [tok.eos_id]
  assert len(f["tokens"]) == 16 and f["tokens"][0] == tok.bos_id
  assert list(f["tokens"][-len(response):]) == response
  assert f["response_mask"].sum() == len(response)
  assert list(f["tokens"][1:-len(response)]) == tok.encode(PROMPT * 4)[-(15 - len(response)):]


def test_overlong_examples_are_dropped_by_config_and_counted(tok, caplog):
  example = {"prompt": PROMPT * 4, "response": RESPONSE}
  sft._OVERLONG_SEEN.clear()
  with caplog.at_level("WARNING"):
    assert sft.SFT(max_len=16, overlong="drop").feature_fn(example, tok) is None
  assert "1 example(s) so far were longer than SFT.max_len and were dropped" in caplog.text
  fits = sft.SFT(max_len=64, overlong="drop").feature_fn({"prompt": PROMPT,
                                                          "response": RESPONSE}, tok)
  assert fits is not None and fits["response_mask"].sum() == len(tok.encode(RESPONSE)) + 1
  with pytest.raises(UserError, match="overlong='cut'"):
    sft.SFT(overlong="cut")


def test_an_empty_response_is_a_clear_error(tok):
  with pytest.raises(UserError, match="empty response .*remove the record"):
    sft.SFT().feature_fn({"prompt": PROMPT, "response": "  "}, tok)


def test_encoder_decoder_puts_the_prompt_in_the_encoder(tok):
  objective = sft.SFT()
  f = objective.feature_fn({"prompt": PROMPT, "response": RESPONSE}, tok)
  assert list(f["inputs"]) == tok.encode(PROMPT) + [tok.eos_id]
  assert list(f["targets"]) == tok.encode(RESPONSE) + [tok.eos_id]
  lengths = {"inputs": 32, "targets": 16}
  model = _model(tok.vocab_size, "encoder_decoder")
  params = _init(model, objective, lengths)
  batch = {k: np.pad(f[k], (0, n - len(f[k])))[None] for k, n in lengths.items()}
  batch.update({f"{k}_segment_ids": (batch[k] > 0).astype(np.int32) for k in lengths})
  got = jax.jit(lambda p, b: objective.loss_sums(model, p, b))(params, batch)
  want = jax.jit(lambda p, b: seq2seq.encoder_decoder_sums(model, p, b, start_id=tok.bos_id))(
      params, batch)
  assert float(got["weight"]) == len(f["targets"])
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)


def test_layout_errors(tok):
  objective = sft.SFT()
  with pytest.raises(UserError, match="feature_lengths"):
    objective.init_inputs({"tokens": 64})
  with pytest.raises(UserError, match="one length for both"):
    objective.init_inputs({"tokens": 64, "response_mask": 32})
  batch = {"tokens": jnp.ones((1, 8), jnp.int32), "response_mask": jnp.ones((1, 8), jnp.int32)}
  with pytest.raises(UserError, match="encoder-only"):
    objective.loss_sums(_model(tok.vocab_size, "encoder_only"), {}, batch)
  with pytest.raises(UserError, match="'inputs': L, 'targets': L"):
    objective.loss_sums(_model(tok.vocab_size, "encoder_decoder"), {}, batch)
  with pytest.raises(UserError, match="'prompt' and 'response'"):
    objective.feature_fn({"text": "no pair"}, tok)


def test_answer_accuracy_per_task(tok):
  """A stand-in model that puts all mass on the true next token is right on every
  answer; one wrong response token makes that answer wrong."""
  records = [dict(EXAMPLES[0], task="speaker"), dict(EXAMPLES[1], task="play")]
  objective = sft.SFT()
  rows = [objective.feature_fn(r, tok)["tokens"] for r in records]

  class Oracle:
    config = presets.get_preset("tiny")

    @staticmethod
    def apply(variables, tokens, **kwargs):
      nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
      nxt = nxt.at[0, variables["params"]].add(1)  # a wrong guess at that position
      return jax.nn.one_hot(nxt % tok.vocab_size, tok.vocab_size)

  got = objective.answer_accuracy(Oracle, len(rows[0]) - 1, records, tok)  # off the end
  assert got == {"all": 1.0, "play": 1.0, "speaker": 1.0}
  got = objective.answer_accuracy(Oracle, len(rows[0]) - 3, records, tok)  # in the response
  assert got == {"all": 0.5, "play": 1.0, "speaker": 0.0}


def test_sft_debug_run_from_a_checkpoint_learns(tmp_path, data_dir):
  source = str(tmp_path / "source")
  shutil.copytree(FIXTURE, source)
  workdir = str(tmp_path / "sft")
  params = [f"DataConfig.data_dir={data_dir!r}", f"TrainConfig.init_from={source!r}",
            "TrainConfig.num_steps=30", "TrainConfig.log_every=5", "TrainConfig.eval_every=30",
            "TrainConfig.checkpoint_every=30", "OptimizerConfig.peak_lr=0.01"]
  argv = ["train", "--gin_file=runs/sft_debug.gin", f"--workdir={workdir}"]
  assert cli.main(argv + [f"--gin_param={p}" for p in params]) == 0
  records = metrics_lib.read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train][-1] == 30 and any("eval_loss" in r for r in records)
  assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
  assert all(0 < r["tokens"] < 8 * 64 for r in train)  # response tokens only
