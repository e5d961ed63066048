"""`Einsum`: the one dense layer every product with a weight in the network goes through.

Shape letters used across `llmjax/layers` and `llmjax/models`:
  B batch, L query length, S key length, D embed, N query heads, K key/value heads,
  H head dim, F mlp hidden, V vocab.

Every matmul reads as an einsum (`'BLD,DNH->BLNH'`), keeps its parameters in
`param_dtype`, computes in the compute `dtype` and accumulates in float32. How XLA is
made to run the product fast on each backend is `llmjax.kernels.dense.product`'s
business; the layer only says what is computed.

Having one layer is what lets LoRA, adapters and quantization change every projection
from outside the model (`llmjax.layers.intercept`; gemma's `peft/_interceptors.py`
pattern): an interceptor may wrap or replace `__call__` (the product) or `weights` (the
parameters as the product uses them). Fused q/k/v (`Attention`) builds its one product
from the three layers' `weights` and still calls each layer, with `Joint`.
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.kernels import dense

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Joint:
  """A layer's output (bias included) that its caller computed in one product with
  other layers' (fused q/k/v), for exactly the input `x`. The layer uses it only
  when it is called with that very `x`: an interceptor that changes the input gets the
  product recomputed."""
  x: jax.Array
  y: jax.Array


class Einsum(nn.Module):
  """`y = einsum(equation, x, kernel) + bias` with parameters `kernel` and `bias`.

  Attributes:
    equation: e.g. 'BLD,DNH->BLNH'; the second operand is the kernel.
    shape: kernel shape, e.g. (D, N, H).
    axes: logical axis names of the kernel, one per dimension.
    use_bias: add a bias over the kernel dimensions that end the output.
    kernel_init: initializer of the kernel.
    dtype: compute dtype; param_dtype: storage dtype.
    pad_last_to: compute with the kernel's output-ending axis zero-padded to a multiple
      of this and slice the output back ('BLD,DV->BLV': GPU tiles divide the padded
      vocabulary); parameters unchanged.
  """

  equation: str
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool = False
  kernel_init: Initializer = nn.initializers.normal(0.02)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  pad_last_to: int = 1

  def setup(self):
    self.kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                             self.shape, self.param_dtype)
    if self.use_bias:
      # The bias spans the kernel dims that end the output, e.g. (N, H) of 'BLD,DNH->BLNH'.
      _, kernel_letters, out_letters = self.equation.replace("->", ",").split(",")
      keep = [i for i, c in enumerate(kernel_letters) if c in out_letters]
      if not out_letters.endswith("".join(kernel_letters[i] for i in keep)):
        raise ValueError(f"Einsum bias needs the kernel's output dims last: {self.equation}")
      init = nn.with_logical_partitioning(nn.initializers.zeros,
                                          tuple(self.axes[i] for i in keep))
      self.bias = self.param("bias", init, tuple(self.shape[i] for i in keep),
                             self.param_dtype)

  @nn.compact  # creates nothing itself; lets an interceptor add parameters (LoRA's A, B)
  def __call__(self, x: jax.Array, joint: Joint | None = None) -> jax.Array:
    kernel, bias = self.weights()
    if joint is not None and joint.x is x:
      y = joint.y  # computed with other layers in one product (fused q/k/v)
    else:
      # float32 accumulation; also what makes bfloat16 products fast on CPU.
      y = dense.product(self.equation, x.astype(self.dtype), kernel, bias,
                        pad_to=self.pad_last_to)
    return y.astype(self.dtype)

  def weights(self) -> tuple[jax.Array, jax.Array | None]:
    """`(kernel in the compute dtype, bias or None)`, as the product uses them (the bias
    is added to the float32 product, so it keeps its storage dtype)."""
    return self.kernel.astype(self.dtype), (self.bias if self.use_bias else None)
