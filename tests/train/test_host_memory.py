"""host_memory.configure: a step's large temporary block is reused instead of re-faulted.

Each case runs in a fresh process (the setting must precede the XLA backend, which the
test session has long started) and counts minor page faults per call (median) of a jitted
function whose temporaries (a 64 MB transposed copy) XLA:CPU allocates as one block.
"""

import json
import os
import subprocess
import sys

import pytest

from llmjax.errors import UserError
from llmjax.train import host_memory

_SCRIPT = r"""
import json, resource, sys
from llmjax.train import host_memory
applied = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.ones((int(sys.argv[2]), 4096), jnp.float32)
w = jnp.ones((int(sys.argv[2]), 8), jnp.float32)
step = jax.jit(lambda x, w: (x.T * 2.0 + 1.0) @ w).lower(x, w).compile()
temp = step.memory_analysis().temp_size_in_bytes
faults = []
for _ in range(24):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(faults)[len(faults) // 2]  # median: calls that still grow the heap are rarer
print(json.dumps({"applied": applied, "temp": temp, "faults": faults}))
"""


# One CPU device, whatever XLA_FLAGS the test session runs with.
_ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}


def _faults_per_call(mode, rows):
  out = subprocess.run([sys.executable, "-c", _SCRIPT, mode, str(rows)], capture_output=True, text=True,
                       check=True, env=_ENV)
  return json.loads(out.stdout.strip().splitlines()[-1])


# reuse: a 64 MiB block (the main heap grows to any size); reuse_threads: 40 MiB (over
# glibc's 32 MiB mmap ceiling, within a thread arena's 64 MiB heap).
@pytest.mark.parametrize("mode,rows", [("reuse", 4096), ("reuse_threads", 2560)])
def test_reuse_keeps_the_step_block_mapped(mode, rows):
  system, reuse = _faults_per_call("system", rows), _faults_per_call(mode, rows)
  pages = system["temp"] / 4096
  assert system["temp"] >= rows * 4096 * 4, system
  if host_memory._glibc() is None or system["faults"] < 0.5 * pages:
    pytest.skip(f"this C library does not unmap the block on free ({system})")
  assert reuse["applied"] and not system["applied"]
  # glibc's default: the whole block is faulted in again on every call.
  assert system["faults"] >= 0.9 * pages, system
  # reuse: the freed block stays mapped and most calls fault (almost) nothing. (Until the
  # heap has a hole that fits the block between calls, a call may still grow it.)
  assert reuse["faults"] < 0.02 * pages, reuse


def test_bad_mode_names_the_choices():
  with pytest.raises(UserError, match="reuse, reuse_threads, system"):
    host_memory.configure("cached")


def test_system_mode_changes_nothing():
  assert host_memory.configure("system") is False
