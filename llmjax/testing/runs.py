"""Run `llmjax train` in-process on the debug config, for tests of the training loop."""


def debug_train(workdir: str, data_dir: str, *params: str,
                gin_file: str = "runs/debug.gin") -> int:
  """`llmjax train --gin_file=... --workdir=... --no_sample` with `--gin_param`s; the exit
  code. `data_dir` is the TFDS directory (built on first use)."""
  from llmjax import cli
  argv = ["train", f"--gin_file={gin_file}", f"--workdir={workdir}", "--no_sample",
          f"--gin_param=DataConfig.data_dir={data_dir!r}"]
  return cli.main(argv + [f"--gin_param={p}" for p in params])


# The model shape of the tiny run checkpointed at commit a5996b6 (the `fixture_run`
# fixture of tests/conftest.py): runs/debug.gin at these bindings.
FIXTURE_SHAPE = ("get_preset.embed_dim=16", "get_preset.num_heads=2", "get_preset.mlp_dim=32",
                 "get_preset.dropout_rate=0.1")


def warm_start_train(workdir: str, data_dir: str, source: str, *gin_files: str,
                     params=(), sample: bool = False) -> int:
  """`llmjax train` of runs/debug.gin plus `gin_files` (e.g. 'peft/lora.gin') at the
  fixture's shape, warm-started from `source`; the exit code."""
  from llmjax import cli
  argv = ["train", "--gin_file=runs/debug.gin", *(f"--gin_file={f}" for f in gin_files),
          f"--workdir={workdir}", *([] if sample else ["--no_sample"])]
  bindings = [f"DataConfig.data_dir={data_dir!r}", f"TrainConfig.init_from={source!r}",
              *FIXTURE_SHAPE, *params]
  return cli.main(argv + [f"--gin_param={p}" for p in bindings])


def param_leaves(tree) -> dict:
  """`{keystr: numpy array}` of every leaf of a parameter tree."""
  import jax
  import numpy as np
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
