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

Kept blocks can also pile up. XLA:CPU asks for the block with `posix_memalign(64, n)`,
and glibc 2.36's memalign needs a free chunk of n + 96 bytes: once small allocations take
the few bytes on either side of a freed block, that hole can no longer hold the block and
the step grows the heap by a whole block instead (nanoGPT-char, one device: 1 step in 40;
on two devices the heap grew from 1.8 to 3.6 GB in 14 steps, then stopped; a 64 MB toy
block: up to every other call, without end). So the train loop also calls
`trim_if_grown()` after each step: once the process's resident size is more than twice
its size after the first step (at least 256 MB over), `malloc_trim(0)` hands the free
pages of all holes back to the system (the next step faults its block in again) and the
size after the next step becomes the new baseline. Resident memory stays within about
twice the working set plus one block.

It must run before the XLA backend starts (the first jax computation or device query):
XLA's threads take their malloc arena at their first allocation and keep it. The train
loop calls it first thing with `RuntimeConfig.host_malloc` ("reuse", the default,
"reuse_threads", or "system" for glibc's defaults). Outside glibc (macOS, musl) it does nothing.
"""

import ctypes
import logging
import platform
import resource

from llmjax.errors import UserError

MODES = ("reuse", "reuse_threads", "system")
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_state = {"applied": False, "warned": False, "baseline": None}
SLACK_BYTES = 256 << 20


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
                    "(RuntimeConfig.host_malloc).")
  if mode == "system" or _state["applied"]:
    return False
  libc = _glibc()
  if libc is None:
    return False
  if backend_started() and not _state["warned"]:
    _state["warned"] = True
    logging.getLogger(__name__).warning(
        f"host_malloc={mode!r} set after the XLA backend started: its threads keep their own "
        "malloc arenas, so large step buffers may still be unmapped every step. Call "
        "llmjax.train.host_memory.configure() before the first jax computation.")
  settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)]  # no mmap; -1: never trim
  if mode == "reuse":
    settings.append((_M_ARENA_MAX, 1))
  ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
  _state["applied"] = ok
  return ok


def _resident_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def trim_if_grown(slack_bytes: int | None = None) -> bool:
  """Call after each step: if `configure` changed malloc and the process's resident size
  is more than `slack_bytes` above the baseline, returns the heap's free pages to the
  system with `malloc_trim(0)`. Returns whether it trimmed.

  `slack_bytes`: None = the baseline itself, at least `SLACK_BYTES` (256 MB): the heap may
  hold up to twice the working set. Within that, kept holes usually settle (in a 40-step
  probe of bfloat16 nanoGPT-char on two devices, the untrimmed heap grew from 1.8 to
  3.6 GB over 14 steps and then stopped), and trimming earlier costs more faults than it
  saves.

  The baseline is the resident size at the first call and again at the first call after
  each trim: the working set as the next step re-faults it, so memory the run needs (a
  second device's block, an eval step's) raises the baseline once instead of trimming
  every step. Cheap: one read of /proc/self/statm. (Not `getrusage`'s peak: Linux carries
  a parent's peak across `exec`, so a child started by a large process would see the
  parent's.) A no-op when `configure` did not apply a mode.
  """
  if not _state["applied"]:
    return False
  resident = _resident_bytes()
  if _state["baseline"] is None:
    _state["baseline"] = resident
  if slack_bytes is None:
    slack_bytes = max(SLACK_BYTES, _state["baseline"])
  if resident - _state["baseline"] <= slack_bytes:
    return False
  _glibc().malloc_trim(ctypes.c_size_t(0))
  _state["baseline"] = None  # re-measured after the next step
  return True
