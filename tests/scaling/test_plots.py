"""Scaling-law plots (llmjax/scaling/plots.py): a small synthetic sweep is fitted by all three
approaches and every plot is written as a PNG."""

import numpy as np

from llmjax.scaling import fit, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep(law):
  """Runs at 3 budgets, 5 model sizes around each budget's optimum, 1% loss noise."""
  rng = np.random.default_rng(0)
  points = []
  for flops in (1e17, 1e18, 1e19):
    n_opt, _ = law.optimal(flops)
    for n in n_opt * np.exp(np.linspace(-1.5, 1.5, 5)):
      d = flops / (6 * n)
      points.append({"flops": flops, "n": n, "d": d,
                     "loss": float(law.loss(n, d) * np.exp(rng.normal(0, 0.01)))})
  return points


def _curves(points):
  """A training curve per run: loss along its own token count, to the run's final budget."""
  curves = []
  for p in points:
    tokens = np.geomspace(p["d"] / 20, p["d"], 30)
    curves.append({"n": p["n"], "flops": 6 * p["n"] * tokens, "tokens": tokens,
                   "loss": fit.EPOCH.loss(p["n"], tokens)})
  return curves


def _assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_every_plot_writes_a_png(tmp_path):
  points = _sweep(fit.EPOCH)
  column = {k: [p[k] for p in points] for k in ("flops", "n", "d", "loss")}
  isoflops = fit.fit_isoflops(column["flops"], column["n"], column["loss"])
  law_fit = fit.fit_law(column["n"], column["d"], column["loss"], grid=fit.COARSE_GRID,
                        bootstrap=8)
  envelope = fit.fit_envelope(_curves(points), num_bins=12)
  written = [
      plots.plot_isoflops(points, isoflops, tmp_path / "isoflops.png"),
      plots.plot_frontier(isoflops, law_fit, tmp_path / "frontier.png", envelope=envelope),
      plots.plot_frontier(None, law_fit, tmp_path / "frontier_law_only.png"),
      plots.plot_frontier(isoflops, None, tmp_path / "sub" / "frontier_isoflops_only.png"),
      plots.plot_loss_vs_compute(points, law_fit.law, tmp_path / "loss.png",
                                 extrapolate_to=1e21),
  ]
  assert written[0] == str(tmp_path / "isoflops.png")
  for path in written:
    _assert_png(path)
