"""host_memory: a step's large temporary block is reused instead of re-faulted, and kept
blocks that pile up are handed back.

Each case runs in a fresh process (the setting must precede the XLA backend, which the
test session has long started) and counts minor page faults per call.
"""

import json
import os
import subprocess
import sys

import pytest

from llmjax.errors import UserError
from llmjax.train import host_memory

# glibc alone: a 64 MiB block malloc'ed, touched and freed, eight times. (Not with
# posix_memalign as XLA:CPU asks: glibc 2.36 leaves the alignment slack on either side
# of such a block as small free chunks, and when they are taken the freed block's hole is
# too small for the next request; see the module docstring and the XLA test below.)
_MALLOC_SCRIPT = r"""
import ctypes, json, resource, sys
from llmjax.train import host_memory
applied = host_memory.configure(sys.argv[1])
libc, size = ctypes.CDLL(None), 64 << 20
libc.malloc.restype = ctypes.c_void_p
faults = []
for _ in range(8):
  p = ctypes.c_void_p()
  p.value = libc.malloc(ctypes.c_size_t(size))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(p, 1, size)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  libc.free(p)
print(json.dumps({"applied": applied, "pages": size // resource.getpagesize(), "faults": faults}))
"""

# trim_if_grown: a freed 64 MiB block held below a live small allocation (a hole the heap
# keeps under "reuse") is handed back once resident memory is over the slack.
_TRIM_SCRIPT = r"""
import ctypes, json, sys
from llmjax.train import host_memory
host_memory.configure("reuse")
libc, size = ctypes.CDLL(None), 64 << 20
libc.malloc.restype = ctypes.c_void_p
first = host_memory.trim_if_grown(slack_bytes=16 << 20)  # sets the baseline
block = ctypes.c_void_p(libc.malloc(ctypes.c_size_t(size)))
ctypes.memset(block, 1, size)
pin = ctypes.c_void_p(libc.malloc(ctypes.c_size_t(4096)))  # keeps the block off the heap top
libc.free(block)
held = host_memory._resident_bytes()
default = host_memory.trim_if_grown()  # slack: the baseline, at least 256 MB
trimmed = host_memory.trim_if_grown(slack_bytes=16 << 20)
after = host_memory._resident_bytes()
rearmed = host_memory.trim_if_grown(slack_bytes=16 << 20)  # takes a new baseline
again = host_memory.trim_if_grown(slack_bytes=16 << 20)
live = ctypes.c_void_p(libc.malloc(ctypes.c_size_t(size)))  # the working set grows for good
ctypes.memset(live, 1, size)
grown = [host_memory.trim_if_grown(slack_bytes=16 << 20) for _ in range(3)]
print(json.dumps({"first": first, "default": default, "trimmed": trimmed, "rearmed": rearmed,
                  "again": again, "released": held - after, "grown": grown}))
"""

# XLA: a jitted function whose temporaries (a 64 MiB transposed copy) XLA:CPU allocates as
# one block, with the train loop's trim_if_grown after each call.
_XLA_SCRIPT = r"""
import json, resource, sys
from llmjax.train import host_memory
applied = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.ones((int(sys.argv[2]), 4096), jnp.float32)
w = jnp.ones((int(sys.argv[2]), 8), jnp.float32)
step = jax.jit(lambda x, w: (x.T * 2.0 + 1.0) @ w).lower(x, w).compile()
temp = step.memory_analysis().temp_size_in_bytes
faults, resident, trims = [], [], 0
for _ in range(24):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  trims += host_memory.trim_if_grown(slack_bytes=temp // 2)
  resident.append(host_memory._resident_bytes())
print(json.dumps({"applied": applied, "temp": temp, "faults": faults, "resident": resident,
                  "trims": trims}))
"""


# One CPU device, whatever XLA_FLAGS the test session runs with.
_ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}


def _run(script, *args):
  out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                       text=True, check=True, env=_ENV)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _skip_unless_glibc_unmaps(system, pages):
  if host_memory._glibc() is None or min(system["faults"]) < 0.5 * pages:
    pytest.skip(f"this C library does not unmap a large block on free ({system})")


@pytest.mark.parametrize("mode", ["reuse", "reuse_threads"])
def test_freed_aligned_block_is_reused_without_faults(mode):
  system, reuse = _run(_MALLOC_SCRIPT, "system"), _run(_MALLOC_SCRIPT, mode)
  pages = system["pages"]
  _skip_unless_glibc_unmaps(system, pages)
  assert reuse["applied"] and not system["applied"]
  # glibc's default maps a fresh block each time: every page faults again.
  assert min(system["faults"]) >= 0.9 * pages, system
  # reuse: the first block is faulted in once; every later one is the same memory.
  assert reuse["faults"][0] >= 0.9 * pages, reuse
  assert max(reuse["faults"][1:]) < 0.01 * pages, reuse


# reuse: a 64 MiB block (the main heap grows to any size); reuse_threads: 40 MiB (over
# glibc's 32 MiB mmap ceiling, within a thread arena's 64 MiB heap).
@pytest.mark.parametrize("mode,rows", [("reuse", 4096), ("reuse_threads", 2560)])
def test_xla_step_block_stays_mapped_and_resident_memory_stays_bounded(mode, rows):
  system, reuse = _run(_XLA_SCRIPT, "system", rows), _run(_XLA_SCRIPT, mode, rows)
  pages = system["temp"] / 4096
  assert system["temp"] >= rows * 4096 * 4, system
  _skip_unless_glibc_unmaps(system, pages)
  assert reuse["applied"] and not system["applied"]
  assert system["trims"] == 0  # the guard is off unless configure applied a mode
  # glibc's default: XLA's block is mapped afresh and faulted in on every call.
  assert min(system["faults"]) >= 0.9 * pages, system
  # reuse: whether a call finds a freed hole that fits the block depends on which small
  # allocations took the slack around it (in probes, 2 to 19 calls of 40 grew the heap by
  # a block instead); trim_if_grown hands such holes back, and
  # resident memory stays within the slack and one block of its size after the first call.
  limit = reuse["resident"][0] + system["temp"] // 2 + system["temp"] + (16 << 20)
  assert max(reuse["resident"]) <= limit, reuse


def test_trim_hands_back_a_held_hole_and_rebases_on_a_grown_working_set():
  if host_memory._glibc() is None:
    pytest.skip("not glibc")
  out = _run(_TRIM_SCRIPT)
  assert out["first"] is False and out["default"] is False, out  # 64 MB < 256 MB slack
  assert out["trimmed"] is True, out
  assert out["released"] >= 0.9 * (64 << 20), out
  assert out["rearmed"] is False and out["again"] is False, out
  # Memory the process keeps using costs one trim, then becomes the baseline: no trim
  # (and no re-faulting of every freed block) on every later step.
  assert out["grown"] == [True, False, False], out


def test_trim_is_a_no_op_unless_configure_applied(monkeypatch):
  monkeypatch.setitem(host_memory._state, "applied", False)
  assert host_memory.trim_if_grown(slack_bytes=0) is False


def test_bad_mode_names_the_choices():
  with pytest.raises(UserError, match="reuse, reuse_threads, system"):
    host_memory.configure("cached")


def test_system_mode_changes_nothing():
  assert host_memory.configure("system") is False
