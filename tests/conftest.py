"""Test-wide set-up: 8 simulated CPU devices (for sharding tests), a quiet, offline TFDS,
and one persistent XLA compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

import pytest

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")  # never reach for GCS metadata in tests
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One temporary folder for the session, made and removed (at exit) by the controlling
# process; pytest-xdist workers and every subprocess inherit it through the environment.
if "LLMJAX_TESTS_TMP" not in os.environ:
  os.environ["LLMJAX_TESTS_TMP"] = tempfile.mkdtemp(prefix="llmjax-tests-")
  atexit.register(shutil.rmtree, os.environ["LLMJAX_TESTS_TMP"], ignore_errors=True)
# Many tests run the same programs in fresh processes (CLI runs, sweeps, kill-and-resume,
# two-process multi-host, notebook kernels, benchmark workers); they share this cache,
# so a program that took over a second to compile is compiled once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ["LLMJAX_TESTS_TMP"], "xla"))
# Under pytest-xdist (scripts/test.sh runs two workers) each worker builds TFDS datasets
# that a test leaves at the default location (the benchmarks' corpus) in its own folder.
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ.setdefault("TFDS_DATA_DIR", os.path.join(
      os.environ["LLMJAX_TESTS_TMP"], "tfds-" + os.environ["PYTEST_XDIST_WORKER"]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data directory per test module (datasets are built into it on first use)."""
  return str(tmp_path_factory.mktemp("tfds"))


FIXTURE_RUN = os.path.join(os.path.dirname(__file__), "data", "fixtures", "a5996b6_tiny_run")


@pytest.fixture
def fixture_run(tmp_path):
  """A copy of the tiny debug run checkpointed at commit a5996b6 (step 3; its model:
  `llmjax.testing.runs.FIXTURE_SHAPE`), to warm-start or resume from."""
  import shutil
  source = str(tmp_path / "source")
  shutil.copytree(FIXTURE_RUN, source)
  return source
