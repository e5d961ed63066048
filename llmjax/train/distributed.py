"""Multi-host start-up: `jax.distributed.initialize` from flags, the environment, or the
cluster itself.

Every process of a multi-host run calls `initialize(...)` before touching any device. The
coordinator address, process count and process id come from (first found wins)
  1. flags: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`,
  2. the environment: LLMJAX_COORDINATOR_ADDRESS / LLMJAX_NUM_PROCESSES /
     LLMJAX_PROCESS_ID (or jax's own JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
     JAX_PROCESS_ID),
  3. the cluster: on multi-host Cloud TPU VMs, SLURM (`srun`, more than one task) and Open
     MPI jax detects all three by itself.
With none of these, the run is single-process and nothing happens. After start-up every
process sees all global devices; the mesh spans them and each process feeds its own rows
of the global batch (`llmjax.data.pipeline` already slices by `jax.process_index()`).
"""

import logging
import os

import jax

from llmjax.errors import UserError

_log = logging.getLogger(__name__)
_ENV = {"coordinator_address": ("LLMJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
        "num_processes": ("LLMJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
        "process_id": ("LLMJAX_PROCESS_ID", "JAX_PROCESS_ID")}


def add_flags(parser):
  """Adds --coordinator_address, --num_processes and --process_id to an argparse parser."""
  group = parser.add_argument_group("multi-host (default: environment or auto-detect)")
  group.add_argument("--coordinator_address", default=None,
                     help="HOST:PORT of process 0's coordinator service")
  group.add_argument("--num_processes", type=int, default=None, help="number of processes")
  group.add_argument("--process_id", type=int, default=None, help="this process, 0-based")


def _from_env(name):
  for var in _ENV[name]:
    if os.environ.get(var):
      return os.environ[var]
  return None


def cluster_detected() -> bool:
  """Whether this is one process of a multi-process job jax can configure by itself."""
  env = os.environ
  tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return ("," in tpu_hosts
          or (bool(env.get("SLURM_JOB_ID")) and int(env.get("SLURM_NTASKS", "1")) > 1)
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def _settings(coordinator_address, num_processes, process_id):
  """Explicit values, else the environment's, as (address, count, id) or all None."""
  values = {"coordinator_address": coordinator_address, "num_processes": num_processes,
            "process_id": process_id}
  for name, value in values.items():
    values[name] = value if value is not None else _from_env(name)
  given = [name for name, value in values.items() if value is not None]
  if given and len(given) < 3:
    missing = sorted(set(values) - set(given))
    raise UserError(f"multi-host start-up got {given} but not {missing}; pass all three "
                    "(--coordinator_address, --num_processes, --process_id or the "
                    "LLMJAX_* environment variables) or none of them.")
  if not given:
    return None, None, None
  try:
    count, index = int(values["num_processes"]), int(values["process_id"])
  except ValueError as e:
    raise UserError(f"num_processes and process_id must be integers ({e}); fix the flag "
                    "or environment variable.") from e
  if not 0 <= index < count:
    raise UserError(f"process_id={index} is not in [0, num_processes={count}); give each "
                    "process a distinct id below the process count.")
  return str(values["coordinator_address"]), count, index


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax's distributed runtime if this is a multi-process run; returns whether it
  did (idempotent: a second call, or a call after another `initialize`, is a no-op)."""
  if jax.distributed.is_initialized():
    return False
  address, count, index = _settings(coordinator_address, num_processes, process_id)
  if address is not None:
    if count == 1:
      return False
    jax.distributed.initialize(address, count, index)
  elif cluster_detected():
    jax.distributed.initialize()  # jax reads the TPU / SLURM / MPI environment
  else:
    return False
  _log.info("process %d of %d: %d local of %d global devices", jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def initialize_from_flags(args) -> bool:
  """`initialize` with the values of `add_flags`'s flags in an argparse namespace."""
  return initialize(getattr(args, "coordinator_address", None),
                    getattr(args, "num_processes", None), getattr(args, "process_id", None))
