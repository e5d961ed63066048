"""Token-level losses, computed in f32 and returned as sums so that gradient accumulation
and multi-host reductions stay exact (divide once, at the end, by the total weight)."""

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits, targets, weights, z_loss: float = 0.0):
  """Softmax cross-entropy with an optional z-loss (PaLM, Chowdhery et al. 2022, §5).

  Args:
    logits: [B, L, V] in any float dtype (upcast to f32 here).
    targets: [B, L] int token ids.
    weights: [B, L] 0/1 loss mask.
    z_loss: coefficient of log(Z)^2, which keeps the softmax normaliser near 1.
  Returns:
    dict of sums over the batch: `loss` (cross-entropy + z-loss), `nll` (cross-entropy
    only), `z_loss`, `correct` (argmax hits), `weight` (number of scored tokens).
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, L]
  nll = log_z - target_logit
  zl = z_loss * jnp.square(log_z)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
      "loss": jnp.sum((nll + zl) * weights),
      "nll": jnp.sum(nll * weights),
      "z_loss": jnp.sum(zl * weights),
      "correct": jnp.sum(correct * weights),
      "weight": jnp.sum(weights),
  }


def summarize(sums):
  """Turns summed metrics into per-token means: loss, perplexity, accuracy."""
  weight = jnp.maximum(sums["weight"], 1.0)
  nll = sums["nll"] / weight
  return {
      "loss": sums["loss"] / weight,
      "nll": nll,
      "perplexity": jnp.exp(nll),
      "accuracy": sums["correct"] / weight,
      "z_loss": sums["z_loss"] / weight,
      "tokens": sums["weight"],
  }
