"""`llmjax sweep fit`: a sweep's finished runs -> the three Chinchilla fits, plots, fit.json.

The points are the runs' final eval losses (nats per token, or bits per byte when sweeps
with different tokenizers are fitted together) against N (non-embedding by default,
Kaplan et al. 2020; `--params=total` as Chinchilla counts) and D (tokens trained).
Approach 1 reads the training-loss curves, Approach 2 the IsoFLOP groups, Approach 3 fits
L(N, D) to every point (`scaling/fit.py`).

C = k N D: the fits use the sweep's own FLOPs-per-parameter-token k, the median of
C / (N D) over the runs (C from the exact matmul count, `scaling/counts.py`). At these small
widths the head and attention add much to 6 N, so k is well above 6; the Chinchilla
planner's k = 6 is the large-model limit.
"""

import json
import os

import numpy as np

from llmjax.errors import UserError
from llmjax.scaling import fit
from llmjax.scaling import sweep as sweep_lib


def load_records(sweep_dirs, loss_key: str, partial: bool = False) -> list[dict]:
  """Every run of the sweeps, checked: all finished (or `partial`), one tokenizer unless
  the loss is in bits per byte."""
  records, unfinished = [], []
  for sweep_dir in sweep_dirs:
    manifest = sweep_lib.read_manifest(sweep_dir)
    for r in sweep_lib.collect(sweep_dir, manifest):
      (records if r["eval_loss"] is not None else unfinished).append(r)
  if unfinished and not partial:
    ids = ", ".join(r["id"] for r in unfinished[:8]) + (" ..." if len(unfinished) > 8 else "")
    raise UserError(f"{len(unfinished)} of {len(records) + len(unfinished)} runs have no final "
                    f"eval loss yet ({ids}); finish them with `llmjax sweep run "
                    f"--sweep_dir=...`, or pass --partial to fit the finished ones only.")
  if not records:
    raise UserError("no run of the sweep has finished; run `llmjax sweep run` first.")
  tokenizers = {r["tokenizer_sha"] for r in records}
  if len(tokenizers) > 1 and loss_key != "bits_per_byte":
    raise UserError(f"the runs use {len(tokenizers)} different tokenizers, so their losses "
                    "per token are not comparable; fit with --loss=bits_per_byte.")
  if loss_key == "bits_per_byte" and any(r["bits_per_byte"] is None for r in records):
    raise UserError("a sweep manifest lacks bytes_per_token (planned before it existed); "
                    "re-plan it with `llmjax sweep plan` to fit in bits per byte.")
  return records


def points(records, params_key: str, loss_key: str) -> dict:
  key = "params" if params_key == "total" else "non_embedding_params"
  arr = lambda name: np.array([r[name] for r in records], dtype=float)
  return {"n": arr(key), "d": arr("tokens"), "flops": arr("flops"), "loss": arr(loss_key),
          "budget": np.array([r["budget"] or np.nan for r in records], dtype=float),
          "ids": [r["id"] for r in records]}


def fit_all(records, params_key="non_embedding", loss_key="eval_loss", bootstrap=200,
            seed=0) -> dict:
  """Approaches 1-3 over the records, with k = median C / (N D)."""
  p = points(records, params_key, loss_key)
  k = float(np.median(p["flops"] / (p["n"] * p["d"])))
  out = {"params": params_key, "loss": loss_key, "k": k, "n_points": len(p["n"])}
  law_fit = fit.fit_law(p["n"], p["d"], p["loss"], bootstrap=bootstrap, seed=seed)
  out["approach3"] = law_fit.to_dict()
  top = float(p["flops"].max())
  try:  # the allocation at the sweep's largest compute and two extrapolations
    out["allocation"] = fit.summary(law_fit.law, [top, 10 * top, 100 * top], k)
  except UserError as e:  # a fitted exponent <= 0 has no optimum
    out["allocation"] = {"error": str(e)}
  iso = None
  if not np.isnan(p["budget"]).any() and len(set(p["budget"])) >= 2:
    try:
      iso = fit.fit_isoflops(p["budget"], p["n"], p["loss"], k=k)
      out["approach2"] = iso.to_dict()
    except UserError as e:  # e.g. a budget whose runs do not bracket a minimum
      out["approach2"] = {"error": str(e)}
  key = "params" if params_key == "total" else "non_embedding_params"
  curves = [{"n": r[key], "flops": np.array(r["curve_flops"], float),
             "tokens": np.array(r["curve_tokens"], float),
             "loss": np.array(r["curve_loss"], float)} for r in records if r["curve_loss"]]
  envelope = None
  try:
    envelope = fit.fit_envelope(curves)
    out["approach1"] = envelope.to_dict()
  except UserError as e:  # e.g. one model dominates every FLOP count
    out["approach1"] = {"error": str(e)}
  out["_objects"] = (p, law_fit, iso, envelope)
  return out


def holdout(records, params_key, loss_key, bootstrap, seed) -> dict:
  """Fits without the largest budget and predicts that budget's best loss."""
  budgets = sorted({r["budget"] for r in records if r["budget"]})
  if len(budgets) < 3:
    raise UserError("the hold-out check needs an IsoFLOP sweep with at least 3 budgets.")
  top = budgets[-1]
  rest = [r for r in records if r["budget"] != top]
  fitted = fit_all(rest, params_key, loss_key, bootstrap=0, seed=seed)
  law = fit.Law.from_dict(fitted["approach3"]["law"])
  observed = min(r[loss_key] for r in records if r["budget"] == top)
  predicted = float(law.predict(top, fitted["k"]))
  return {"budget": top, "predicted": predicted, "observed": observed,
          "error": predicted - observed, "relative_error": predicted / observed - 1}


def fit_command(args) -> int:
  from llmjax.scaling import plots

  records = load_records(args.sweep_dir, args.loss, args.partial)
  result = fit_all(records, args.params, args.loss, args.bootstrap)
  p, law_fit, iso, envelope = result.pop("_objects")
  if args.holdout:
    result["holdout"] = holdout(records, args.params, args.loss, args.bootstrap, 0)
  out_dir = args.output or os.path.join(args.sweep_dir[0], "fit")
  os.makedirs(out_dir, exist_ok=True)
  pts = [{"flops": f, "n": n, "d": d, "loss": lo, "budget": b}
         for f, n, d, lo, b in zip(p["flops"], p["n"], p["d"], p["loss"], p["budget"])]
  written = [plots.plot_loss_vs_compute(pts, law_fit.law, os.path.join(out_dir, "loss_vs_compute.png"),
                                        extrapolate_to=10 * p["flops"].max())]
  if iso is not None:
    written.append(plots.plot_isoflops(pts, iso, os.path.join(out_dir, "isoflops.png")))
  written.append(plots.plot_frontier(iso, law_fit, os.path.join(out_dir, "frontier.png"),
                                     envelope=envelope))
  result["plots"] = [os.path.basename(w) for w in written]
  with open(os.path.join(out_dir, "fit.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=float)
  print_summary(result)
  print(f"fit.json and {len(written)} plots -> {out_dir}")
  return 0


def print_summary(result: dict) -> None:
  law3 = result["approach3"]
  iv = law3.get("intervals", {})
  print(f"{result['n_points']} runs; N = {result['params']} params; loss = {result['loss']}; "
        f"k = C/(N D) = {result['k']:.2f}")
  print("Approach 3: L(N, D) = E + A/N^alpha + B/D^beta")
  law = fit.Law.from_dict(law3["law"])
  for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
    value = getattr(law, name)
    band = f"  [{iv[name][0]:.4g}, {iv[name][1]:.4g}]" if name in iv else ""
    print(f"  {name:5} {value:10.4g}{band}")
  alloc = result.get("allocation")
  if isinstance(alloc, list):
    print(f"compute-optimal under Approach 3 (C = {result['k']:.2f} N D):")
    for row in alloc:
      print(f"  C {row['flops']:9.3g}  N_opt {row['n_opt']:9.3g}  D_opt {row['d_opt']:9.3g}  "
            f"{row['tokens_per_param']:7.1f} tokens/param  loss {row['loss']:.4f}")
  elif alloc:
    print(f"compute-optimal allocation: {alloc['error']}")
  for key, label in (("approach2", "Approach 2 (IsoFLOP parabolas)"),
                     ("approach1", "Approach 1 (envelope)")):
    if key in result and "error" not in result[key]:
      n_law = result[key].get("n_opt_law", result[key]["n_opt"])
      d_law = result[key].get("d_opt_law", result[key]["d_opt"])
      print(f"{label}: N_opt ~ C^{n_law['exponent']:.3f}, D_opt ~ C^{d_law['exponent']:.3f}")
    elif key in result:
      print(f"{label}: {result[key]['error']}")
  if "holdout" in result:
    h = result["holdout"]
    print(f"hold-out: fit without C={h['budget']:.3g}: predicted best loss {h['predicted']:.4f}, "
          f"observed {h['observed']:.4f} ({h['relative_error']:+.2%})")
