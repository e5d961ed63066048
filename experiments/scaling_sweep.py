"""A real IsoFLOP sweep on this machine: 25 GPTs over 4 FLOP budgets on Shakespeare, fitted
by the three approaches of Hoffmann et al. (2022), with a hold-out check.

Command (from the repository root, after `bash scripts/setup_env.sh`):
  .venv/bin/python experiments/scaling_sweep.py --sweep_dir workdirs/sweep

It runs `llmjax sweep plan --gin_file=sweeps/shakespeare_isoflop.gin`, `llmjax sweep run`
(resumable: re-running finishes a killed sweep) and `llmjax sweep fit --holdout`, then
prints the table below. The sweep (gin_configs/sweeps/shakespeare_isoflop.gin): budgets
1e12, 3e12, 1e13, 3e13 FLOPs (exact matmul counts, `scaling/counts.py`); 11 GPT shapes from
2 x 16 to 6 x 192 (head 16, MLP 4x), each budget keeping the shapes whose D / N lies in
[2.2, 2000]; a char tokenizer (89 pieces); batch 16 x 128; AdamW, peak lr 3e-3, 5% warmup,
cosine; final eval loss on 20 validation batches (scenes never trained on). N is the
non-embedding count (Kaplan et al. 2020); C = k N D with this sweep's k = median C / (N D)
(attention over 128 positions and the head add to 6 N at these widths).

Result (session 2026-12-06; 2-core Intel Xeon CPU, no accelerator; all 25 runs finished).
Wall time: the sweep ran 23:09-01:20 (131 min), but not alone: for 70 min a second
`sweep run` (the 6 runs added when the window was widened) shared the two cores, and for the
last 70 min the full test suite did too; the runs' own wall times sum to 193.5 min under
that contention. An uncontended timing of the whole sweep was not run (alone, 40-step probes
of these shapes trained 60k tok/s at 2 x 64 down to 8.8k at 4 x 192). A re-run for the timing
(session 2026-12-07, `--sweep_dir workdirs/sweep_alone`, sharing the cores only with niced
test processes) was stopped after 46 min and 13 runs, because it could not finish near
90 min: the 1e12 and 3e12 runs took 0.9-3.9 min each (25 min for all 12), but one 1e13 run,
2 x 32 (N 25k, D 49M characters: the small models are the least efficient per FLOP here),
took 15.3 min alone, and the six 3e13 runs took 129 min in the contended sweep above. As
configured the sweep needs roughly two hours on this machine; to fit ~90 min the largest
budget must shrink (or the D / N window's top end: 2 x 48 at 3e13 is the slowest run). The run files (compact metrics,
manifest, tokenizer, plots) are in experiments/results/scaling_sweep: `llmjax sweep fit
--sweep_dir=experiments/results/scaling_sweep --holdout` refits them.

IsoFLOP minima (Approach 2 parabolas in ln N; every minimum inside its budget's range):
  C 1e12: N_opt 9.5k, D_opt 12.9M, loss 1.925      C 1e13: N_opt 69k,  D_opt 17.6M, loss 1.521
  C 3e12: N_opt 23k,  D_opt 16.0M, loss 1.697      C 3e13: N_opt 160k, D_opt 22.9M, loss 1.393
Approach 3 (1000 bootstraps, 90% intervals), k = C / (N D) = 8.20:
  E 0.586 [3e-10, 0.887]  A 5.84 [2.91, 15.6]  B 157 [50.7, 1658]
  alpha 0.218 [0.086, 0.351]  beta 0.355 [0.259, 0.535]  a 0.620 [0.500, 0.827]  b 0.380 [0.173, 0.500]
Exponent a (N_opt ~ C^a): Approach 1 (envelope of training curves) 0.217, Approach 2 0.841,
Approach 3 0.620; Chinchilla's Approach-3 constants give 0.452, Epoch's replication 0.513.
Hold-out: fitted without the 3e13 budget, Approach 3 predicts its best loss 1.333; the best
run there reached 1.3825 (error -3.6%).
Compute-optimal tokens per parameter under the fitted law: 524 at 3e13, 302 at 3e14.

What it says: at 6k-800k parameters on 5M characters, compute-optimal models are small and
data-hungry (hundreds of tokens per parameter, not Chinchilla's ~20; the data repeat up to
12 times at the largest budget, which the law does not model), the optimal size grows faster
with compute than Chinchilla's (a > 0.5 by Approaches 2 and 3), and the approaches disagree
widely over 1.5 decades of C: four budgets and 6-7 shapes each are too few for tight
exponents (Approach 1's envelope is dominated by the long runs of small models; Approach 2
rests on four minima). E's interval reaches 0: the irreducible loss is not identified here.
"""

import argparse
import io
import json
import os
import sys
import time
from contextlib import redirect_stdout

from llmjax import cli
from llmjax.scaling import fit
from llmjax.scaling import sweep as sweep_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep_dir", default="workdirs/sweep")
  parser.add_argument("--gin_file", default="sweeps/shakespeare_isoflop.gin")
  parser.add_argument("--bootstrap", type=int, default=1000)
  parser.add_argument("--parallel", type=int, default=1)
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.sweep_dir, sweep_lib.MANIFEST)):
    _cli("sweep", "plan", f"--gin_file={args.gin_file}", f"--sweep_dir={args.sweep_dir}")
  start = time.time()
  _cli("sweep", "run", f"--sweep_dir={args.sweep_dir}", f"--parallel={args.parallel}")
  print(f"sweep wall time (this invocation): {(time.time() - start) / 60:.1f} min")
  out = io.StringIO()
  with redirect_stdout(out):
    _cli("sweep", "fit", f"--sweep_dir={args.sweep_dir}", f"--bootstrap={args.bootstrap}",
         "--holdout")
  print(out.getvalue())
  with open(os.path.join(args.sweep_dir, "fit", "fit.json"), encoding="utf-8") as f:
    result = json.load(f)
  print_tables(args.sweep_dir, result)


def _cli(*argv):
  code = cli.main(list(argv))
  if code:
    sys.exit(code)


def print_tables(sweep_dir, result):
  manifest = sweep_lib.read_manifest(sweep_dir)
  records = sweep_lib.collect(sweep_dir, manifest)
  print("| run | N non-emb | D tokens | C FLOPs | eval loss | minutes |")
  print("|---|---|---|---|---|---|")
  for r in records:
    path = os.path.join(sweep_lib.workdir(sweep_dir, r), sweep_lib.RESULT)
    with open(path, encoding="utf-8") as f:
      seconds = json.load(f)["seconds"]
    print(f"| {r['id']} | {r['non_embedding_params']:,} | {r['tokens']:.3g} | "
          f"{r['flops']:.3g} | {r['eval_loss']:.4f} | {seconds / 60:.1f} |")
  law = fit.Law.from_dict(result["approach3"]["law"])
  iv = result["approach3"]["intervals"]
  print("\n| Approach 3 | fit | 90% bootstrap interval |\n|---|---|---|")
  for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
    lo, hi = iv.get(name, (float("nan"), float("nan")))
    print(f"| {name} | {getattr(law, name):.4g} | [{lo:.4g}, {hi:.4g}] |")
  print("\n| approach | a (N_opt ~ C^a) | b (D_opt ~ C^b) |\n|---|---|---|")
  for key, label in (("approach1", "1: envelope"), ("approach2", "2: IsoFLOP")):
    r = result.get(key, {})
    if "error" in r or not r:
      print(f"| {label} | - | - |  ({r.get('error', 'not fitted')})")
      continue
    n_law, d_law = r.get("n_opt_law", r.get("n_opt")), r.get("d_opt_law", r.get("d_opt"))
    print(f"| {label} | {n_law['exponent']:.3f} | {d_law['exponent']:.3f} |")
  print(f"| 3: parametric | {law.a:.3f} | {law.b:.3f} |")
  print(f"| Chinchilla (Hoffmann 2022, approach 3) | {fit.CHINCHILLA.a:.3f} | "
        f"{fit.CHINCHILLA.b:.3f} |")
  print(f"| Epoch (Besiroglu 2024) | {fit.EPOCH.a:.3f} | {fit.EPOCH.b:.3f} |")
  h = result.get("holdout")
  if h:
    print(f"\nhold-out: fitted without C={h['budget']:.3g}, predicted best loss "
          f"{h['predicted']:.4f}, observed {h['observed']:.4f} "
          f"({h['relative_error']:+.2%})")


if __name__ == "__main__":
  main()
