"""Compile time vs depth: the llmjax train step of a 24-layer vs a 2-layer model.

Command (repository root):
  .venv/bin/python -m benchmarks.compile_depth --rounds 3

With scanned layers (`scan_layers=True`, the default) XLA compiles one block whatever the
depth, so the 24-layer step should compile in <= 1.3x the 2-layer time; `--unscanned`
adds the Python-loop stack for contrast. Width and context are nanoGPT-char's (384, 256,
batch 16); only the depth changes. Each compile runs in a fresh process (no cache), the
depths interleaved round-robin; the ratio is taken per round.
"""

import argparse
import statistics

from benchmarks import common

FACTORY = "benchmarks.compile_depth:CompileImpl"


class CompileImpl:
  """Lowers and compiles the jitted train step of one depth; reports the seconds."""

  def __init__(self, num_layers: int, scan_layers: bool = True):
    import time

    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    from benchmarks.train_vs_torch import NextTokenLM
    from llmjax.models.presets import get_preset
    from llmjax.models.transformer import Transformer
    from llmjax.optim import optimizers
    from llmjax.train import step as step_lib
    from llmjax.train.state import TrainState
    cfg = get_preset("nanogpt-char", vocab_size=65, num_layers=num_layers, dropout_rate=0.0,
                     scan_layers=scan_layers)
    model = Transformer(cfg)
    tx = optimizers.adamw(1e-3, b2=0.99)
    tokens = jax.ShapeDtypeStruct((16, 256), jnp.int32)
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 256), jnp.int32))["params"]))
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params),
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    step = jax.jit(step_lib.make_train_step(model, NextTokenLM(), tx, optax.constant_schedule(1e-3)),
                   donate_argnums=0)
    start = time.perf_counter()
    lowered = step.lower(state, {"inputs": tokens, "targets": tokens})
    self.lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    self.compile_s = time.perf_counter() - start

  def info(self):
    return {"lower_s": self.lower_s, "compile_s": self.compile_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--depths", default="2,24")
  parser.add_argument("--unscanned", action="store_true", help="also time unscanned stacks")
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  print(f"cpu: {common.cpu_info()}", flush=True)
  depths = [int(d) for d in args.depths.split(",")]
  variants = [(d, True) for d in depths] + ([(d, False) for d in depths] if args.unscanned
                                            else [])
  times = {v: [] for v in variants}
  for r in range(args.rounds):
    for depth, scan in common.rotate(variants, r):
      worker = common.Worker(f"{depth}", FACTORY, {"num_layers": depth, "scan_layers": scan},
                             threads=args.threads)
      info = worker.start()
      worker.stop()
      times[(depth, scan)].append(info["lower_s"] + info["compile_s"])
      print(f"round {r + 1}: {depth} layers {'scanned' if scan else 'unscanned'}: lower "
            f"{info['lower_s']:.1f}s + compile {info['compile_s']:.1f}s", flush=True)
  rows = []
  for depth, scan in variants:
    base = times[(depths[0], scan)]
    st = common.ratio_stats(times[(depth, scan)], base)
    rows.append([f"{depth} {'scanned' if scan else 'unscanned'}",
                 f"{statistics.median(times[(depth, scan)]):.1f}",
                 f"{st['median']:.2f}x", f"{st['p25']:.2f}x", f"{st['min']:.2f}x"])
  common.print_table(rows, ["layers", "lower+compile s", f"vs {depths[0]} median", "p25",
                            "min"])


if __name__ == "__main__":
  main()
