"""FlashAttention on XLA:CPU: `flash_attention_cpu.cc` behind `jax.ffi`, with its own VJP.

`attention_impl='cpu_flash'` routes training and prefill attention here on the CPU backend.
XLA:CPU runs attention's batched products single-threaded at about half PyTorch's rate and
moves q/k/v into heads-major layouts around them; the kernel reads the model's layouts,
keeps the softmax online in cache-sized tiles (FlashAttention, Dao et al. 2022), skips
the key tiles a causal mask hides and uses XLA's intra-op threads. Attention dropout is
drawn in the kernel from a hash of (seed, batch, head, query, key), so the backward pass
redraws the forward's bits; `dropout_keep_mask` computes the same bits in numpy.

The C++ source is compiled with the machine's C++ compiler (`$CXX`, else g++ or c++;
`-O3 -march=native`) the first time it is needed, into `$LLMJAX_KERNEL_CACHE` (default
`~/.cache/llmjax/kernels`), keyed by a hash of the source, the flags, the compiler,
jaxlib's version and the CPU's features; later processes load the cached library.
Without a compiler `available()` is False and callers fall back to XLA's attention with
one warning.
"""

import ctypes
import functools
import hashlib
import logging
import math
import os
import pathlib
import shutil
import subprocess
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.sharding import PartitionSpec

from llmjax.sharding import axes

SOURCE = pathlib.Path(__file__).with_name("flash_attention_cpu.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
FORWARD, BACKWARD = "llmjax_flash_attention_fwd", "llmjax_flash_attention_bwd"
F32 = jnp.float32

log = logging.getLogger(__name__)


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _machine() -> str:
  """What `-march=native` compiles for: the architecture and its CPU feature flags (a
  cache shared between machines must not hand one machine's build to another)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith("flags")), "")
  except OSError:
    flags = ""
  return f"{os.uname().machine} {flags}"


def build(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Compiles the kernel (or finds it in the cache) and returns the library's path.

  Raises:
    RuntimeError: no C++ compiler, or the compiler failed (its output is in the message).
  """
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set $CXX, or install g++) to build the "
                       "CPU flash-attention kernel")
  source = SOURCE.read_bytes()
  key = hashlib.sha256(source + repr((FLAGS, jaxlib.__version__, cxx, _machine())).encode())
  key = key.hexdigest()[:16]
  cache_dir = pathlib.Path(cache_dir or os.environ.get("LLMJAX_KERNEL_CACHE")
                           or pathlib.Path.home() / ".cache" / "llmjax" / "kernels")
  library = cache_dir / f"flash_attention_cpu-{key}.so"
  if library.exists():
    return library
  cache_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # then renamed: atomic
    partial = pathlib.Path(tmp) / library.name
    command = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(partial)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"building the CPU flash-attention kernel failed:\n"
                         f"{' '.join(command)}\n{result.stderr[-4000:]}")
    os.replace(partial, library)
  log.info("built the CPU flash-attention kernel: %s", library)
  return library


@functools.cache
def available() -> bool:
  """Whether the kernel can run here: the CPU backend, and a library built and registered
  (False, with the reason logged once, otherwise)."""
  if jax.default_backend() != "cpu":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (RuntimeError, OSError) as e:
    log.warning("attention_impl='cpu_flash' is not available, using XLA's attention: %s", e)
    return False
  for name, symbol in ((FORWARD, library.LlmjaxFlashAttentionForward),
                       (BACKWARD, library.LlmjaxFlashAttentionBackward)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
  return True


def _shard_specs(q, k):
  """How the kernel's operands split over the ambient mesh (`jax.set_mesh`): like the
  activations (the BATCH rule over B, HEADS / KV_HEADS over N / K where they divide), so
  a data- or head-parallel step runs attention on each device's own shard. Returns the
  specs of `[B, L, N, H]`, `[B, S, K, H]` and `[B, N, L]` operands (Nones: no mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None, None, None

  def split(name, size):
    names = nn.logical_to_mesh_axes((name,))[0]
    if names is None:
      return None
    ways = math.prod(mesh.shape[n] for n in (names if isinstance(names, tuple) else (names,)))
    return names if size % ways == 0 else None
  batch = split(axes.BATCH, q.shape[0])
  heads, kv_heads = split(axes.HEADS, q.shape[2]), split(axes.KV_HEADS, k.shape[2])
  if (heads is None) != (kv_heads is None):  # query head n must meet kv head n // G
    heads = kv_heads = None
  queries = PartitionSpec(batch, None, heads, None)
  keys = PartitionSpec(batch, None, kv_heads, None)
  return queries, keys, PartitionSpec(batch, heads, None)


def _shard_mapped(call, in_specs, out_specs):
  """`call` per shard (`jax.shard_map`), or as is without a mesh."""
  if in_specs[0] is None:
    return call
  return jax.shard_map(call, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _mask_operand(mask, q, k):
  """A `[B|1, 1, L|1, S|1]` mask as the kernel's `[B, L, S]` booleans (a `[B, 1, 1]`
  placeholder when there is none: every operand leads with the batch)."""
  b, l, s = q.shape[0], q.shape[1], k.shape[1]
  if mask is None:
    return jnp.ones((b, 1, 1), jnp.bool_)
  return jnp.broadcast_to(mask.astype(jnp.bool_), (b, 1, l, s))[:, 0]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                    scale: float, causal: bool, dropout_rate: float = 0.0,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
  """softmax(scale * q k^T, masked) v in float32: `[B, L, N, H]`.

  Args:
    q: `[B, L, N, H]`; k, v: `[B, S, K, H]`, N % K == 0 (query head n reads kv head
      n // (N / K)). Any float dtype; computed and returned in float32.
    mask: boolean, broadcastable to `[B, 1, L, S]` (True = may attend), or None.
    scale: multiplies the scores.
    causal: query l sees keys <= l only (L == S); the hidden key tiles are skipped.
    dropout_rate: attention-probability dropout in [0, 1): each probability is kept with
      probability 1 - rate (and scaled by 1 / (1 - rate)), by bits the kernel hashes from
      `dropout_rng` and (batch, head, query, key) (`dropout_keep_mask` draws the same).
    dropout_rng: a PRNG key; required when dropout_rate > 0.

  A query that may attend to no key gets zeros (and passes no gradient).
  Raises:
    RuntimeError: the kernel cannot run here (see `available()`).
  """
  if not available():
    raise RuntimeError("the CPU flash-attention kernel is not available here (it needs "
                       "the CPU backend and a C++ compiler; the log says why)")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  if dropout_rate > 0 and dropout_rng is None:
    raise ValueError("dropout_rate > 0 needs a dropout_rng (a jax.random key)")
  seed = (dropout_seed(dropout_rng) if dropout_rate > 0 else jnp.zeros((2,), jnp.uint32))
  return _flash(q.astype(F32), k.astype(F32), v.astype(F32), mask, seed, scale, causal,
                float(dropout_rate))


def dropout_seed(rng: jax.Array) -> jax.Array:
  """The kernel's two 32-bit seed words from a PRNG key."""
  return jax.random.bits(rng, (2,), jnp.uint32)


def _mix(h):
  """murmur3's 32-bit finalizer (numpy uint32; the kernel's `Mix`)."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def dropout_keep_mask(seed, rate: float, batch: int, heads: int, q_len: int,
                      k_len: int) -> np.ndarray:
  """The kernel's dropout draws as a boolean `[B, N, L, S]` array (True = kept), computed
  independently in numpy from `seed` (`dropout_seed`'s two words): for reference
  implementations and tests."""
  with np.errstate(over="ignore"):
    s0, s1 = (np.uint32(x) for x in np.asarray(seed, np.uint32))
    b = np.arange(batch, dtype=np.uint32)[:, None, None, None]
    n = np.arange(heads, dtype=np.uint32)[None, :, None, None]
    i = np.arange(q_len, dtype=np.uint32)[None, None, :, None]
    j = np.arange(k_len, dtype=np.uint32)[None, None, None, :]
    h = _mix(s0 ^ _mix(b + np.uint32(0x9E3779B9)))
    h = _mix(h ^ n * np.uint32(0x85EBCA77))
    row = _mix(h ^ s1 ^ i * np.uint32(0xC2B2AE3D))
    bits = _mix(row ^ j * np.uint32(0x9E3779B1))
  threshold = np.uint32(min(int(float(np.float32(rate)) * 2**32), 2**32 - 1))
  return bits >= threshold


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, mask, seed, scale, causal, dropout_rate):
  return _forward(q, k, v, mask, seed, scale, causal, dropout_rate)[0]


def _attrs(mask, scale, causal, dropout_rate):
  return {"scale": np.float32(scale), "causal": bool(causal), "has_mask": mask is not None,
          "dropout_rate": np.float32(dropout_rate)}


def _operand_specs(q, k):
  """`_shard_specs` plus the mask's (split like the batch) and the seed's (replicated)."""
  queries, keys, rows = _shard_specs(q, k)
  if queries is None:
    return queries, keys, rows, None, None
  return queries, keys, rows, PartitionSpec(queries[0]), PartitionSpec()


def _rng_operand(seed, queries, b, n):
  """u32[4]: the seed words and this shard's first global batch row and head (per shard
  inside `shard_map`: so a sharded call draws the bits one device would)."""
  def first(names, size):
    return 0 if names is None else jax.lax.axis_index(names) * size
  batch_axes, head_axes = (None, None) if queries is None else (queries[0], queries[2])
  offsets = jnp.asarray([first(batch_axes, b), first(head_axes, n)], jnp.uint32)
  return jnp.concatenate([seed.astype(jnp.uint32), offsets])


def _forward(q, k, v, mask, seed, scale, causal, dropout_rate):
  queries, keys, rows, masks, seeds = _operand_specs(q, k)

  def call(q, k, v, mask_operand, seed):
    b, l, n, _ = q.shape
    return jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(q.shape, F32),
                                      jax.ShapeDtypeStruct((b, n, l), F32)),
                            vmap_method="sequential")(
        q, k, v, mask_operand, _rng_operand(seed, queries, b, n),
        **_attrs(mask, scale, causal, dropout_rate))
  out, lse = _shard_mapped(call, (queries, keys, keys, masks, seeds), (queries, rows))(
      q, k, v, _mask_operand(mask, q, k), seed)
  return out, (q, k, v, mask, seed, out, lse)


def _backward(scale, causal, dropout_rate, residuals, d_out):
  q, k, v, mask, seed, out, lse = residuals
  queries, keys, rows, masks, seeds = _operand_specs(q, k)

  def call(q, k, v, mask_operand, seed, out, lse, d_out):
    b, _, n, _ = q.shape
    return jax.ffi.ffi_call(
        BACKWARD, tuple(jax.ShapeDtypeStruct(x.shape, F32) for x in (q, k, v)),
        vmap_method="sequential")(q, k, v, mask_operand, _rng_operand(seed, queries, b, n),
                                  out, lse, d_out, **_attrs(mask, scale, causal, dropout_rate))
  d_q, d_k, d_v = _shard_mapped(
      call, (queries, keys, keys, masks, seeds, queries, rows, queries),
      (queries, keys, keys))(
      q, k, v, _mask_operand(mask, q, k), seed, out, lse, d_out.astype(F32))
  return d_q, d_k, d_v, None, None


_flash.defvjp(_forward, _backward)
