"""`llmjax train` runs each architecture's debug gin through the real loop (a few steps).

The MLM and span-corruption debug runs read Shakespeare; here they read a 300-number
num2words set instead (built in a second, where Shakespeare takes ~10 s), which keeps
the three runs quick while going through the same code path.
"""

import pytest

from llmjax import cli
from llmjax.train import metrics as metrics_lib

TINY_DATA = "DataConfig.dataset='num2words_translate/en-fr-300'"


@pytest.mark.parametrize("gin_file, extra", [
    ("runs/mlm_pretrain_debug.gin", [TINY_DATA]),
    ("runs/span_corruption_debug.gin", [TINY_DATA, "SpanCorruption.inputs_length=16",
                                        "DataConfig.feature_lengths={'inputs':16,'targets':8}"]),
    ("runs/translate_num2words_debug.gin", [TINY_DATA]),
])
def test_debug_run_trains_and_evaluates(gin_file, extra, tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "run")
  argv = ["train", f"--gin_file={gin_file}", f"--workdir={workdir}",
          f"--gin_param=DataConfig.data_dir={data_dir!r}", "--gin_param=TrainConfig.num_steps=3",
          "--gin_param=TrainConfig.eval_every=3", "--gin_param=TrainConfig.checkpoint_every=3"]
  argv += [f"--gin_param={p}" for p in extra]
  assert cli.main(argv) == 0  # no --no_sample: these objectives skip the sample themselves
  records = metrics_lib.read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert train and evals and train[-1]["step"] == 3
  assert 0 < train[-1]["loss"] < 10 and train[-1]["tokens"] > 0
  assert "--- sample" not in capsys.readouterr().out
