"""Rematerialization (none / full / dots), scanned and unscanned: same loss and grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.models.presets import get_preset
from llmjax.models.stack import stack_layers, unstack_layers
from llmjax.models.transformer import Transformer
from llmjax.testing import reference

CFG = get_preset("tiny-llama", dropout_rate=0.1)
TOKENS = np.random.default_rng(0).integers(1, 128, size=(2, 8)).astype(np.int32)


@functools.cache
def _params():
  return reference.random_params(Transformer(CFG), TOKENS, std=0.1)


@functools.cache
def _loss_and_grads(cfg, deterministic):
  """(loss, grads) of a toy loss; dropout active unless deterministic."""
  params = _params() if cfg.scan_layers else unstack_layers(_params())

  def loss_fn(p):
    logits = Transformer(cfg).apply({"params": p}, TOKENS, deterministic=deterministic,
                                    rngs={"dropout": jax.random.key(0, impl="rbg")})
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  return loss, grads if cfg.scan_layers else stack_layers(grads)


def _assert_same(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got[1], want[1])


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_scanned_remat_with_dropout_matches_no_remat(remat):
  want = _loss_and_grads(CFG, deterministic=False)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(want[1]))
  # Dropout really is on: the deterministic loss differs.
  assert abs(float(want[0]) - float(_loss_and_grads(CFG, True)[0])) > 1e-4
  _assert_same(_loss_and_grads(CFG.replace(remat=remat), deterministic=False), want)


def test_unscanned_remat_matches_scanned():
  # Deterministic: the dropout streams of a Python loop differ from those of a scan.
  want = _loss_and_grads(CFG, deterministic=True)
  _assert_same(_loss_and_grads(CFG.replace(remat="full", scan_layers=False), True), want)


@pytest.mark.parametrize("remat,scan", [("none", True), ("full", True), ("dots", False)])
def test_remat_really_wraps_the_blocks(remat, scan):
  cfg = CFG.replace(remat=remat, scan_layers=scan)
  params = _params() if scan else unstack_layers(_params())
  jaxpr = str(jax.make_jaxpr(lambda p: Transformer(cfg).apply({"params": p}, TOKENS))(params))
  assert ("checkpoint[" in jaxpr or "remat" in jaxpr) == (remat != "none")
