"""`Einsum`: the one dense layer every projection in the network goes through.

Shape letters used across `llmjax/layers` and `llmjax/models`:
  B batch, L query length, S key length, D embed, N query heads, K key/value heads,
  H head dim, F mlp hidden, V vocab.

Every matmul reads as an einsum (`'BLD,DNH->BLNH'`), keeps its parameters in
`param_dtype`, computes in the compute `dtype` and accumulates in float32
(`preferred_element_type`), which is also what makes bfloat16 matmuls fast on CPU.
Having one layer is what lets LoRA and fake-quant intercept every projection later
(gemma's `_modules.Einsum` / `peft/_interceptors.py` pattern).
"""

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
LOW_PRECISION = (jnp.bfloat16, jnp.float16)  # dtypes whose products get custom gradients


def einsum_f32(equation: str, *operands: jax.Array) -> jax.Array:
  """`jnp.einsum` with float32 accumulation; the result is float32.

  With two bfloat16 (or float16) operands the backward pass runs in that dtype too: the
  cotangent is rounded to it and both gradient products accumulate in float32, as the
  forward does (mixed precision as in Micikevicius et al. 2018). `jnp.einsum`'s own
  transpose would upcast both operands to float32, at half the speed on CPUs with
  bf16 dot instructions (benchmarks/README.md). Float32 operands take `jnp.einsum` as is.
  """
  if (len(operands) == 2 and operands[0].dtype == operands[1].dtype
      and operands[0].dtype in LOW_PRECISION and _transposable(equation)):
    return _einsum_low_precision(equation, *operands)
  return jnp.einsum(equation, *operands, preferred_element_type=jnp.float32)


def _letters(equation: str) -> tuple[str, str, str]:
  inputs, out = equation.split("->")
  a, b = inputs.split(",")
  return a, b, out


def _transposable(equation: str) -> bool:
  """Whether both gradients are plain einsums (no ellipsis, repeats or lone reductions)."""
  if "..." in equation or "->" not in equation or equation.count(",") != 1:
    return False
  a, b, out = _letters(equation)
  return (all(len(set(s)) == len(s) for s in (a, b, out))
          and all(c in b or c in out for c in a) and all(c in a or c in out for c in b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_low_precision(equation: str, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.einsum(equation, x, y, preferred_element_type=jnp.float32)


def _einsum_low_precision_fwd(equation, x, y):
  return _einsum_low_precision(equation, x, y), (x, y)


def _einsum_low_precision_bwd(equation, residuals, ct):
  x, y = residuals
  a, b, out = _letters(equation)
  ct = ct.astype(x.dtype)
  gx = jnp.einsum(f"{out},{b}->{a}", ct, y, preferred_element_type=jnp.float32)
  gy = jnp.einsum(f"{a},{out}->{b}", x, ct, preferred_element_type=jnp.float32)
  return gx.astype(x.dtype), gy.astype(y.dtype)


_einsum_low_precision.defvjp(_einsum_low_precision_fwd, _einsum_low_precision_bwd)


def merge_contraction(equation: str, x: jax.Array, y: jax.Array):
  """`('BLNH,NHD->BLD', x, y)` -> `('BLZ,ZD->BLD', x [B, L, N*H], y [N*H, D])`.

  When two or more contracted dims sit side by side, in the same order, in both
  operands, they are merged into one by free reshapes. The product is the same; XLA:CPU
  then sees a plain matrix product and keeps both operands in place, where with two
  contracted dims its layout assignment may copy a transposed kernel on every call
  (on every decoding step, in a loop).
  """
  a, b, out = _letters(equation)
  run = "".join(c for c in a if c in b and c not in out)
  if len(run) < 2 or run not in a or run not in b or "Z" in equation or "." in equation:
    return equation, x, y
  i, j = a.index(run), b.index(run)
  size = math.prod(x.shape[i:i + len(run)])
  x = x.reshape(x.shape[:i] + (size,) + x.shape[i + len(run):])
  y = y.reshape(y.shape[:j] + (size,) + y.shape[j + len(run):])
  return f"{a.replace(run, 'Z')},{b.replace(run, 'Z')}->{out}", x, y


def _merge_free(equation: str, x: jax.Array, kernel: jax.Array, leading: bool = True):
  """Merge the free dims of x that lead the output (batch, length) and the free dims
  of the kernel that end it (heads, head dim), each run into one dim, by free reshapes.

  `('BLD,DNH->BLNH', x [B, L, D], k [D, N, H])` -> `('YD,DX->YX', [B*L, D], [D, N*H])`.
  Returns `(equation, x, kernel, out_shape)`; `leading=False` leaves x's dims as they are.
  """
  a, b, out = _letters(equation)
  if "." in equation or "Y" in equation or "X" in equation:
    return equation, x, kernel, None
  sizes = dict(zip(a, x.shape)) | dict(zip(b, kernel.shape))
  out_shape = tuple(sizes[c] for c in out)
  lead = ""
  for c, o in zip(a, out):
    if not leading or c != o or c in b:
      break
    lead += c
  trail = ""
  for c, o in zip(reversed(b), reversed(out)):
    if c != o or c in a:
      break
    trail = c + trail
  if len(lead) >= 2:
    x = x.reshape((math.prod(x.shape[:len(lead)]),) + x.shape[len(lead):])
    a, out = "Y" + a[len(lead):], "Y" + out[len(lead):]
  if len(trail) >= 2:
    keep = len(b) - len(trail)
    kernel = kernel.reshape(kernel.shape[:keep] + (math.prod(kernel.shape[keep:]),))
    b, out = b[:-len(trail)] + "X", out[:-len(trail)] + "X"
  return f"{a},{b}->{out}", x, kernel, out_shape


def matmul(equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`einsum_f32(equation, x, kernel)` as a product of as few dims as possible (same
  result, float32).

  Leading batch dims of x and trailing dims of the kernel that survive into the output
  are merged (`'BLD,DNH->BLNH'` runs as `'YD,DX->YX'`), then adjacent contracted dims
  (`merge_contraction`). Then the forward product and both gradients each contract one
  dim. With two (`'BLD,BLF->DF'` for a kernel gradient) XLA:CPU copies a transposed
  operand for every weight gradient and fuses a recomputation of the residual stream
  into that copy (benchmarks/README.md: about 10% of a small model's train step).

  Low-precision operands keep their leading dims: XLA:CPU runs a bfloat16 kernel
  gradient contracted over a single leading dim as a float32 Eigen product (at half the
  speed), and over two as a transposed copy plus a bfloat16 YNNPACK product.
  """
  equation, x, kernel, out_shape = _merge_free(equation, x, kernel,
                                               leading=x.dtype not in LOW_PRECISION)
  y = einsum_f32(*merge_contraction(equation, x, kernel))
  return y if out_shape is None else y.reshape(out_shape)


def pad_axis_to(a: jax.Array, axis: int, multiple: int) -> jax.Array:
  """`a` with zeros appended along `axis` up to a multiple of `multiple` (as is if it
  divides already)."""
  size = a.shape[axis]
  if multiple <= 1 or size % multiple == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, -size % multiple)
  return jnp.pad(a, widths)


class Einsum(nn.Module):
  """`y = einsum(equation, x, kernel) + bias` with parameters `kernel` and `bias`.

  Attributes:
    equation: e.g. 'BLD,DNH->BLNH'; the second operand is the kernel.
    shape: kernel shape, e.g. (D, N, H).
    axes: logical axis names of the kernel, one per dimension.
    use_bias: add a bias over the kernel dimensions that appear in the output.
    kernel_init: initializer of the kernel.
    dtype: compute dtype; param_dtype: storage dtype.
    pad_last_to: compute with the kernel's last axis zero-padded to a multiple of this
      and slice the output back (that axis must end the output, e.g. 'BLD,DV->BLV'):
      a product whose width tiles divide runs faster on GPUs; parameters unchanged.
  """

  equation: str
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool = False
  kernel_init: Initializer = nn.initializers.normal(0.02)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  pad_last_to: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        self.shape, self.param_dtype)
    kernel = kernel.astype(self.dtype)
    if self.pad_last_to > 1:
      if self.equation[-1] != self.equation.split("->")[0][-1]:
        raise ValueError(f"pad_last_to needs the kernel's last axis to end the output: "
                         f"{self.equation}")
      kernel = pad_axis_to(kernel, -1, self.pad_last_to)
    y = matmul(self.equation, x.astype(self.dtype), kernel)[..., :self.shape[-1]]
    if self.use_bias:
      # The bias spans the kernel dims that survive into the output, e.g. (N, H).
      kernel_letters = self.equation.split("->")[0].split(",")[1]
      out_letters = self.equation.split("->")[1]
      keep = [i for i, c in enumerate(kernel_letters) if c in out_letters]
      bias_init = nn.with_logical_partitioning(nn.initializers.zeros,
                                               tuple(self.axes[i] for i in keep))
      bias = self.param("bias", bias_init, tuple(self.shape[i] for i in keep),
                        self.param_dtype)
      if not out_letters.endswith("".join(kernel_letters[i] for i in keep)):
        raise ValueError(f"Einsum bias needs the kernel's output dims last: {self.equation}")
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)
