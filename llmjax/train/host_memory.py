"""Host memory: keep the blocks XLA:CPU frees for its next step instead of unmapping them.

XLA:CPU gives each run of a compiled step its temporaries as one block (1545 MiB for the
nanoGPT-char train step at batch 16 x 256). glibc's malloc serves any block over 32 MB
with a fresh `mmap` and returns it with `munmap` when freed, so every step faults the
whole block back in page by page and the kernel zeroes each page: ~400,000 page faults
per nanoGPT-char step, about a fifth of its time on a 2-core CPU (PyTorch's tensors are
separate, smaller blocks that glibc recycles).

`configure("reuse")` tells glibc (`mallopt`) to keep such blocks: one malloc arena for
all threads (the main heap, which can grow to any size), no `mmap` for large blocks, no
trimming of the heap's free top. A freed step block then stays mapped and the next step
reuses it without a fault. The price: the process keeps its peak heap size until it
exits, which is what a training process does anyway.

The single arena has a cost of its own: every thread's small allocations take one lock.
For a small model split over several CPU devices (nanoGPT's CPU race config, 2 devices,
bfloat16: 0.79x the speed of glibc's defaults), "reuse_threads" keeps the per-thread
arenas and only stops mapping and trimming (0.95x there, 1.43x on one device in float32);
for the nanoGPT-char step (1.5 GB of temporaries), "reuse" is the one that helps.

It must run before the XLA backend starts (the first jax computation or device query):
XLA's threads take their malloc arena at their first allocation and keep it. The train
loop calls it first thing with `TrainConfig.host_malloc` ("reuse", the default,
"reuse_threads", or "system" for glibc's defaults). Outside glibc (macOS, musl) it does nothing.
"""

import ctypes
import logging
import platform

from llmjax.errors import UserError

MODES = ("reuse", "reuse_threads", "system")
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_state = {"applied": False, "warned": False}


def _glibc():
  """The process's C library if it is glibc (it has `mallopt`), else None."""
  if platform.system() != "Linux":
    return None
  try:
    libc = ctypes.CDLL(None)
  except OSError:
    return None
  return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def backend_started() -> bool:
  """Whether jax has already created its backends (and so XLA's threads)."""
  try:
    from jax._src import xla_bridge
  except ImportError:
    return False
  return bool(getattr(xla_bridge, "_backends", None))


def configure(mode: str = "reuse") -> bool:
  """Sets how freed host memory is kept; returns whether glibc's settings were changed.

  Args:
    mode: "reuse" (keep freed blocks in the process, see the module docstring);
      "reuse_threads" (the same but each thread keeps its own malloc arena, whose
      heaps hold at most 64 MB: blocks larger than that are still mapped per step, but
      many threads allocating small blocks do not wait on one arena's lock); or
      "system" (leave malloc alone; it does not undo an earlier setting).
  """
  if mode not in MODES:
    raise UserError(f"host_malloc={mode!r}; use one of {', '.join(MODES)} "
                    "(TrainConfig.host_malloc).")
  if mode == "system" or _state["applied"]:
    return False
  libc = _glibc()
  if libc is None:
    return False
  if backend_started() and not _state["warned"]:
    _state["warned"] = True
    logging.getLogger(__name__).warning(
        "host_malloc='reuse' set after the XLA backend started: its threads keep their own "
        "malloc arenas, so large step buffers may still be unmapped every step. Call "
        "llmjax.train.host_memory.configure() before the first jax computation.")
  settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)]  # no mmap; -1: never trim
  if mode == "reuse":
    settings.append((_M_ARENA_MAX, 1))
  ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
  _state["applied"] = ok
  return ok
