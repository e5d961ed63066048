"""Bottleneck adapters (Houlsby et al. 2019) after the attention and/or MLP sublayers.

Each adapted sublayer's output `y [..., D]` (the output projection `attention/out`,
`cross_attention/out` or `mlp/wo`, bias included, before dropout and the residual sum)
goes through a small residual MLP of width `size`:

  y' = y + act(y Wd + bd) Wu + bu

  adapter_down_<name>       Wd [D, size]  uniform(+-1/sqrt(D)) (like LoRA's A)
  adapter_down_bias_<name>  bd [size]     zeros
  adapter_up_<name>         Wu [size, D]  zeros: step 0 computes exactly the base model
  adapter_up_bias_<name>    bu [D]        zeros

The parameters are created beside the projection's kernel by the interceptor
(`llmjax.layers.intercept`), so the model is not edited: the adapter of
`decoder/layers/mlp/wo` lives in `decoder/layers/mlp/wo/adapter_*_<name>` (scanned layers
stack it along the layer axis like the kernel). Houlsby's adapter sits exactly there,
inside the sublayer's residual branch, before the (post-)norm: `TransformerBlock`
computes `x + dropout(y')` (pre-norm) or `norm(x + dropout(y'))` (post-norm, BERT).

Unlike LoRA, the nonlinearity means the adapter cannot be folded into the kernels:
`PeftModel.merged` keeps it, generation runs the network through the interceptors, and
`convert --to_hf` refuses (Hugging Face PEFT has no Houlsby-adapter format for these
models).
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.errors import UserError
from llmjax.layers.mlp import activation_fn
from llmjax.sharding.axes import EMBED

# Module-path regexes (searched) of the sublayer output projections.
PLACEMENTS = {
    "attention": r"attention/out$",              # self- and cross-attention
    "mlp": r"mlp/wo$",
    "both": r"attention/out$|mlp/wo$",
}
ACTIVATIONS = ("relu", "gelu", "gelu_exact", "silu")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Where the adapters go and their width (gin: `AdapterConfig.*`)."""

  placement: str = "both"      # 'both' | 'attention' | 'mlp' | a regex over module paths
  size: int = 64               # the bottleneck width
  activation: str = "gelu"     # relu | gelu (tanh approximation) | gelu_exact | silu
  name: str = "default"        # several adapters in one tree differ by name

  def __post_init__(self):
    if not isinstance(self.size, int) or self.size <= 0:
      raise UserError(f"AdapterConfig.size={self.size!r} must be a positive integer.")
    if self.activation not in ACTIVATIONS:
      raise UserError(f"AdapterConfig.activation={self.activation!r}: use one of "
                      f"{', '.join(ACTIVATIONS)}.")
    if not re.fullmatch(r"[A-Za-z0-9]+", self.name):
      raise UserError(f"AdapterConfig.name={self.name!r}: use letters and digits only.")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise UserError(f"AdapterConfig.placement={self.placement!r} is not one of "
                      f"{sorted(PLACEMENTS)} nor a valid regex ({e}).") from e

  @property
  def pattern(self) -> str:
    return PLACEMENTS.get(self.placement, self.placement)

  def names(self) -> tuple[str, str, str, str]:
    """The parameter names `(down, down bias, up, up bias)` of this adapter."""
    return tuple(f"adapter_{p}_{self.name}" for p in ("down", "down_bias", "up", "up_bias"))

  def selects(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None

  @property
  def trainable(self) -> str:
    """A regex for `OptimizerConfig.trainable`: this adapter's parameters only."""
    return rf"/adapter_(down|up)(_bias)?_{self.name}$"


class Adapter:
  """The interceptor of one adapter: `with intercept(Adapter(cfg), path=cfg.selects)`."""

  mergeable = False

  def __init__(self, config: AdapterConfig):
    self.config = config

  def __call__(self, call):
    y = call.proceed()
    down, down_bias, up, up_bias = self._params(call.module, call.path, y.shape[-1])
    y32 = y.astype(jnp.float32)
    act = activation_fn(self.config.activation)
    h = act(jnp.einsum("...D,DA->...A", y32, down.astype(jnp.float32),
                       preferred_element_type=jnp.float32) + down_bias)    # [..., size]
    delta = jnp.einsum("...A,AD->...D", h, up.astype(jnp.float32),
                       preferred_element_type=jnp.float32) + up_bias       # [..., D]
    return (y32 + delta).astype(y.dtype)

  def _params(self, layer, path: str, features: int):
    cfg = self.config
    kernel_letters, out_letters = layer.equation.replace("->", ",").split(",")[1:]
    kept = [c for c in kernel_letters if c in out_letters]
    if len(kept) != 1 or not out_letters.endswith(kept[0]):
      raise UserError(f"AdapterConfig.placement={cfg.placement!r} selects {path} "
                      f"({layer.equation}), whose output does not end in one feature "
                      "axis; adapters go after output projections (placement 'both', "
                      "'attention' or 'mlp').")
    axis = layer.axes[kernel_letters.index(kept[0])] or EMBED
    bound = 1.0 / features ** 0.5
    init_down = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    zeros = nn.initializers.zeros
    specs = ((init_down, (axis, None), (features, cfg.size)),
             (zeros, (None,), (cfg.size,)),
             (zeros, (None, axis), (cfg.size, features)),
             (zeros, (axis,), (features,)))
    return [layer.param(name, nn.with_logical_partitioning(init, axes), shape,
                        layer.param_dtype)
            for name, (init, axes, shape) in zip(cfg.names(), specs)]
