"""A real IsoFLOP sweep on this machine: 23 GPTs over 4 FLOP budgets on Shakespeare, fitted
by the three approaches of Hoffmann et al. (2022), with a hold-out check.

Command (from the repository root, after `bash scripts/setup_env.sh`):
  .venv/bin/python experiments/scaling_sweep.py --sweep_dir workdirs/sweep

It runs `llmjax sweep plan --gin_file=sweeps/shakespeare_isoflop.gin`, `llmjax sweep run`
(resumable: re-running finishes a killed sweep) and `llmjax sweep fit --holdout`, then
prints the tables below. The sweep (gin_configs/sweeps/shakespeare_isoflop.gin): budgets
1e12, 2e12, 4e12, 8e12 FLOPs (exact matmul counts, `scaling/counts.py`); 11 GPT shapes
from 2 x 16 to 6 x 192 (head 16, MLP 4x), each budget keeping the shapes whose D / N lies
in [2.2, 2000] (5-6 per budget); N from 6.6k to 608k non-embedding parameters, D from
0.56M to 30M characters; a char tokenizer (89 pieces); batch 16 x 128; AdamW, peak lr
3e-3, 5% warmup, cosine; final eval loss on 20 validation batches (scenes never trained
on). N is the non-embedding count (Kaplan et al. 2020); C = k N D with this sweep's
k = median C / (N D) = 8.20 (attention over 128 positions and the head add to 6 N at
these widths).

Result (session 2026-12-07; 2-core Intel Xeon CPU, no accelerator; `--sweep_dir
workdirs/sweep_v3`, all 23 runs finished). Wall time of the whole sweep: 59.9 min
(05:29-06:29), one run at a time. The cores were not idle: for most of that hour
lower-priority (`nice -n 19`) processes ran beside it (another study, unit tests of
other work, a C++ build), which take only the cycles the sweep leaves. The 1e12 runs took
0.7-1.5 min, 2e12 1.0-2.2, 4e12 2.2-4.2, 8e12 3.0-8.2 (2 x 32, the slowest: the small
models are the least efficient per FLOP here). An earlier configuration with budgets up
to 3e13 (25 runs) needed about two hours, so the top budget was lowered to 8e12. The run
files (compact metrics, manifest, tokenizer, plots) are in
experiments/results/scaling_sweep: `llmjax sweep fit
--sweep_dir=experiments/results/scaling_sweep --holdout` refits them to the same numbers.

  run (layers x width, C)   N non-emb   D chars   eval loss
  1e12: L2_D16 6.6k 10.6M 1.977 | L1_D32 12.8k 7.1M 1.832 | L2_D32 25k 3.8M 2.003 |
        L2_D48 57k 2.0M 2.094 | L2_D64 100k 1.2M 2.160 | L3_D80 234k 0.56M 2.361
  2e12: L1_D32 1.766 | L2_D32 1.770 | L2_D48 1.830 | L2_D64 1.892 | L3_D80 2.146 |
        L3_D96 (336k) 2.181
  4e12: L2_D32 1.655 | L2_D48 1.671 | L2_D64 1.697 | L3_D80 1.859 | L3_D96 1.929
  8e12: L2_D32 1.595 | L2_D48 1.510 | L2_D64 1.554 | L3_D80 1.689 | L3_D96 1.723 |
        L4_D112 (608k) 1.841

IsoFLOP minima (Approach 2 parabolas in ln N; every minimum inside its budget's range):
  C 1e12: N_opt 9.5k, D_opt 12.9M, loss 1.925      C 4e12: N_opt 36k, D_opt 13.5M, loss 1.650
  C 2e12: N_opt 18k,  D_opt 13.6M, loss 1.760      C 8e12: N_opt 56k, D_opt 17.3M, loss 1.543
Approach 3 (1000 bootstraps, 90% intervals), k = C / (N D) = 8.20:
  E 0.202 [1e-10, 0.941]  A 8.61 [3.06, 27.5]  B 40.5 [31.3, 889]
  alpha 0.262 [0.102, 0.418]  beta 0.234 [0.208, 0.491]  a 0.472 [0.402, 0.797]
  b 0.528 [0.204, 0.599]
Exponent a (N_opt ~ C^a): Approach 1 (envelope of training curves) 0.200, Approach 2
0.874, Approach 3 0.472; Chinchilla's Approach-3 constants give 0.452, Epoch's
replication 0.513.
Hold-out: fitted without the 8e12 budget, Approach 3 predicts its best loss 1.4664; the
best run there reached 1.5099 (error -2.9%).
Compute-optimal tokens per parameter under the fitted law: 1535 at 8e12, 1746 at 8e13.

What it says: at 6k-600k parameters on 5M characters, compute-optimal models are tiny and
data-hungry (~1,500 tokens per parameter, not Chinchilla's ~20; the largest budget
repeats the data up to 6 times, which the law does not model). Approach 3's a = 0.47 is
close to Chinchilla's 0.45 and Epoch's 0.51, but its interval is wide (0.40-0.80), and
the three approaches disagree over less than one decade of C: four minima give Approach 2
a steep, poorly constrained slope (its N_opt nearly quadruples from 2e12 to 8e12 while D_opt
barely moves), and Approach 1's envelope is dominated by the long runs of the smallest
models. E's interval reaches 0: the irreducible loss is not identified at this scale. The
previous configuration (budgets to 3e13, session 2026-12-06) gave a = 0.62 by Approach 3
and a hold-out error of -3.6%.
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
