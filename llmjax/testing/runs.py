"""Run `llmjax train` in-process on the debug config, for tests of the training loop."""


def debug_train(workdir: str, data_dir: str, *params: str,
                gin_file: str = "runs/debug.gin") -> int:
  """`llmjax train --gin_file=... --workdir=... --no_sample` with `--gin_param`s; the exit
  code. `data_dir` is the TFDS directory (built on first use)."""
  from llmjax import cli
  argv = ["train", f"--gin_file={gin_file}", f"--workdir={workdir}", "--no_sample",
          f"--gin_param=DataConfig.data_dir={data_dir!r}"]
  return cli.main(argv + [f"--gin_param={p}" for p in params])
