"""The dense product behind `layers.linear.Einsum`, with the XLA layout tricks that make
it fast kept out of the layer.

`product(equation, x, kernel, bias)` computes exactly what the layer's docstring says,
`jnp.einsum(equation, x, kernel, preferred_element_type=float32) + bias`, and is the one
place that picks how:

  one row on CPU   a float32 vector times a matrix (a batch-1 decoding step):
                   `row_vector_product` over the output-major kernel;
  otherwise        `matmul`: free dims merged, adjacent contracted dims merged, so the
                   forward product and both gradients each contract a single dim;
                   bfloat16/float16 operands get a backward pass in their own dtype
                   (`einsum_f32`).

Why each trick pays is in its docstring, with the figures in benchmarks/README.md.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

LOW_PRECISION = (jnp.bfloat16, jnp.float16)  # dtypes whose products get custom gradients


def product(equation: str, x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
            *, pad_to: int = 1) -> jax.Array:
  """`einsum(equation, x, kernel) + bias` in float32, the kernel being the second operand.

  `bias` spans the kernel dims that end the output (e.g. `[N, H]` for 'BLD,DNH->BLNH').
  `pad_to`: the product runs over the kernel's output-ending axis zero-padded to a
  multiple of this, and the output is sliced back (GPU tiles divide the padded width).
  """
  _, b, out = _letters(equation)
  one_row = _one_row_kernel(equation, x, kernel) if pad_to == 1 else None
  if one_row is not None:  # a decoding step at batch 1 on CPU
    kernel_t, input_major = one_row                                     # [O, I]
    if bias is None and input_major:
      bias = jnp.zeros(kernel_t.shape[:1], kernel.dtype)  # see row_vector_product
    y = row_vector_product(x.reshape(1, -1), kernel_t, bias)              # [1, O]
    return y.reshape(_out_shape(equation, x, kernel))
  width = kernel.shape[b.index(out[-1])]
  if pad_to > 1:
    kernel = pad_axis_to(kernel, b.index(out[-1]), pad_to)
  y = matmul(equation, x, kernel)[..., :width]
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y


def fused_heads_product(x: jax.Array, weights, kv_heads: int) -> list[jax.Array]:
  """The outputs (bias included, in x's dtype) of several `'BLD,DNH->BLNH'` projections
  of the same `x [B, L, D]` (q, k, v) from one product (float32 accumulation).
  `weights`: `(kernel [D, N, H], bias [N, H] or None)` per projection; N is a multiple
  of `kv_heads` K.

  Each kernel is viewed per key/value head, `[D, K, (N/K)*H]` (head n = k*(N/K) + g, the
  grouped-query order), and the views are concatenated along their last dim: one
  `[D, K, (G+2)H]` kernel for q/k/v. One `[B*L, D] x [D, (N+2K)H]` product runs at about
  twice the FLOP rate of three narrower ones on CPU (benchmarks/README.md), in training
  and decoding alike; a heads-split (tensor parallel) kernel stays split along K.
  """
  per_kv_head = lambda a: a.reshape(a.shape[:-2] + (kv_heads, -1))    # [.., K, G*H | H]
  kernel = jnp.concatenate([per_kv_head(w) for w, _ in weights], -1)  # [D, K, T]
  biases = [b for _, b in weights]
  bias = (None if biases[0] is None                                     # [K, T]
          else jnp.concatenate([per_kv_head(b) for b in biases], -1))
  y = product("BLD,DKT->BLKT", x, kernel, bias).astype(x.dtype)        # [B, L, K, T]
  widths = [per_kv_head(w).shape[-1] for w, _ in weights]
  parts = jnp.split(y, np.cumsum(widths)[:-1].tolist(), axis=-1)
  return [part.reshape(x.shape[:2] + w.shape[-2:]) for part, (w, _) in zip(parts, weights)]


def _one_row_kernel(equation: str, x: jax.Array, kernel: jax.Array):
  """`(kernel [O, I], input_major)` when `row_vector_product` applies (`one_row_layout`:
  float32, one row, on CPU), for kernels stored input-major (`[D, N, H]`, every `Einsum`)
  or output-major (the embedding table `[V, D]` of tied logits); else None."""
  a, b, out = _letters(equation)
  contracted = "".join(c for c in a if c in b)
  kernel_out = b.replace(contracted, "", 1)
  if b == contracted + kernel_out:
    layout = one_row_layout(equation, x, x.dtype)
    return None if layout is None else (kernel.reshape(layout[0], -1).T, True)
  if b == kernel_out + contracted:
    layout = one_row_layout(f"{a},{contracted + kernel_out}->{out}", x, x.dtype)
    return None if layout is None else (kernel.reshape(-1, layout[0]), False)
  return None


def _out_shape(equation: str, x: jax.Array, kernel: jax.Array) -> tuple[int, ...]:
  a, b, out = _letters(equation)
  sizes = dict(zip(a, x.shape)) | dict(zip(b, kernel.shape))
  return tuple(sizes[c] for c in out)


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


def row_vector_product(x: jax.Array, kernel_t: jax.Array, bias: jax.Array | None = None):
  """`x [1, I] @ kernel_t.T + bias` for an output-major `kernel_t [O, I]`: float32 `[1, O]`.

  For one-row products on CPU (a batch-1 decoding step streams every weight from memory
  once per token). XLA:CPU fuses a matrix-vector product whose matrix is the transpose
  of an `[O, I]` array into one loop of row-wise dot products split over the cores,
  while the parameters' `[I, O]` layout runs as a single-threaded product: a nanoGPT-char
  batch-1 decoding step is ~1.4x as fast (benchmarks/README.md, decoding). The bias
  rides along as one more column of the kernel, against a 1 appended to x. That
  concatenation is also what puts the kernel in `[O, I + 1]` layout once, before a
  decoding loop: XLA hoists a loop-invariant concatenation out of the loop but leaves a
  lone transpose in it, where it folds into the product; and with no add after the
  product nothing pulls the product into another kind of fusion. (Kernels stored
  input-major without a bias pass zeros, for the same reason.) Costs a copy of the
  kernels while a decoding loop runs. See `one_row_layout` for when it applies.
  """
  if bias is not None:
    kernel_t = jnp.concatenate([kernel_t, bias.reshape(-1, 1).astype(kernel_t.dtype)], 1)
    x = jnp.concatenate([x, jnp.ones((1, 1), x.dtype)], axis=1)         # [1, I + 1]
  return jnp.matmul(x, kernel_t.T, preferred_element_type=jnp.float32)  # [1, O]


def one_row_layout(equation: str, x: jax.Array, dtype=jnp.float32):
  """`(I, C)` when the product is a float32 vector times a matrix on CPU: x's free dims
  are all 1 and the kernel is its C contracted dims (in x's order, I elements) then the
  output dims, as in every `Einsum` of the network; else None (the general `matmul`).
  Low-precision compute keeps the general product (its bias is added in float32)."""
  a, b, out = _letters(equation)
  contracted = "".join(c for c in a if c in b)
  free = a[:len(a) - len(contracted)]
  if (jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32
      or not contracted or a != free + contracted
      or not b.startswith(contracted) or out != free + b[len(contracted):]
      or math.prod(x.shape[:len(free)]) != 1):
    return None
  return math.prod(x.shape[len(free):]), len(contracted)


def pad_axis_to(a: jax.Array, axis: int, multiple: int) -> jax.Array:
  """`a` with zeros appended along `axis` up to a multiple of `multiple` (as is if it
  divides already)."""
  size = a.shape[axis]
  if multiple <= 1 or size % multiple == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, -size % multiple)
  return jnp.pad(a, widths)
