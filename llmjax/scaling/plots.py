"""Plots of scaling-law fits (llmjax/scaling/fit.py): IsoFLOP profiles, the compute-optimal
frontier N_opt(C), D_opt(C) from each approach of Hoffmann et al. 2022 ("Training
Compute-Optimal Large Language Models"), with the bootstrap band of Besiroglu et al. 2024, and
loss against compute.

`points` are the runs of a sweep, dicts with keys flops, n, d and loss. matplotlib is imported
inside the functions, and figures are drawn on an Agg canvas without pyplot, so importing this
module is cheap and no global backend is switched under an interactive session.
"""

import os

import numpy as np

from llmjax.scaling import fit


def _figure(ncols=1):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
  FigureCanvasAgg(figure)
  return figure, figure.subplots(1, ncols, squeeze=False)[0]


def _save(figure, path) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=110)
  return path


def _column(points, key) -> np.ndarray:
  return np.array([float(p[key]) for p in points])


def plot_isoflops(points, isoflop_fit: fit.IsoflopFit, path) -> str:
  """Loss against N per budget, the fitted parabolas in ln N, and their minima."""
  from matplotlib import colormaps
  figure, (axis,) = _figure()
  flops, n, loss = (_column(points, k) for k in ("flops", "n", "loss"))
  # Each run joins the nearest budget in ln C: a run's actual FLOPs can differ slightly from
  # the nominal budget the fit grouped it by.
  budgets = np.log([b["flops"] for b in isoflop_fit.budgets])
  nearest = np.argmin(np.abs(np.log(flops)[:, None] - budgets[None, :]), axis=1)
  colours = colormaps["viridis"](np.linspace(0, 0.9, len(budgets)))
  for i, (budget, colour) in enumerate(zip(isoflop_fit.budgets, colours)):
    mine = nearest == i
    label = f"C = {budget['flops']:.2g}"
    axis.scatter(n[mine], loss[mine], color=colour, s=18, label=label)
    span = np.log(np.concatenate([n[mine], [budget["n_opt"]]]))
    x = np.linspace(span.min() - 0.2, span.max() + 0.2, 100)
    axis.plot(np.exp(x), np.polyval(budget["coeffs"], x), color=colour, lw=1)
    axis.scatter([budget["n_opt"]], [budget["loss_opt"]], color=colour, marker="*", s=120,
                 edgecolor="black", zorder=3)
  axis.set(xscale="log", xlabel="parameters N", ylabel="final loss",
           title="IsoFLOP profiles (stars: fitted minima)")
  axis.legend(fontsize=7)
  return _save(figure, path)


def _optimal_band(samples, flops, level=0.9):
  """Percentile band of N_opt(C) and D_opt(C) over bootstrap laws (columns of `samples`)."""
  alpha, beta, a, b = (np.asarray(samples[k], float)[:, None] for k in ("alpha", "beta", "A", "B"))
  with np.errstate(all="ignore"):  # a resample can fit a non-positive exponent: NaN, skipped
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    c = flops[None, :] / 6.0
    n_opt = g * c ** (beta / (alpha + beta))
  n_opt[~np.isfinite(n_opt) | (alpha <= 0) | (beta <= 0)] = np.nan
  tails = [50 * (1 - level), 50 * (1 + level)]
  n_band = np.nanpercentile(n_opt, tails, axis=0)
  return n_band, (flops / 6.0) / n_band[::-1]


def _frontier_range(isoflop_fit, envelope):
  budgets = [b["flops"] for b in isoflop_fit.budgets] if isoflop_fit else []
  budgets += list(envelope.flops) if envelope is not None else []
  if not budgets:
    return np.geomspace(1e18, 1e24, 60)
  return np.geomspace(min(budgets) / 3, max(budgets) * 3, 60)


def plot_frontier(isoflop_fit, law_fit, path, envelope=None) -> str:
  """N_opt(C) and D_opt(C), log-log, from each approach given (None to leave one out); for a
  LawFit with bootstrap samples, the 90% band of its N_opt(C) and D_opt(C)."""
  figure, (n_axis, d_axis) = _figure(2)
  flops = _frontier_range(isoflop_fit, envelope)
  if envelope is not None:
    for axis, values, law in ((n_axis, envelope.n_opt, envelope.n_opt_law),
                              (d_axis, envelope.d_opt, envelope.d_opt_law)):
      axis.scatter(envelope.flops, values, s=10, color="tab:blue")
      axis.plot(flops, law(flops), color="tab:blue", label=f"1: envelope, C^{law.exponent:.3f}")
  if isoflop_fit is not None:
    c = [b["flops"] for b in isoflop_fit.budgets]
    for axis, key, law in ((n_axis, "n_opt", isoflop_fit.n_opt), (d_axis, "d_opt",
                                                                    isoflop_fit.d_opt)):
      axis.scatter(c, [b[key] for b in isoflop_fit.budgets], s=25, color="tab:orange")
      axis.plot(flops, law(flops), color="tab:orange", label=f"2: IsoFLOP, C^{law.exponent:.3f}")
  if law_fit is not None:
    law = law_fit.law
    n_opt, d_opt = law.optimal(flops)
    n_axis.plot(flops, n_opt, color="tab:green", label=f"3: parametric, C^{law.a:.3f}")
    d_axis.plot(flops, d_opt, color="tab:green", label=f"3: parametric, C^{law.b:.3f}")
    if law_fit.samples:
      n_band, d_band = _optimal_band(law_fit.samples, flops)
      n_axis.fill_between(flops, *n_band, color="tab:green", alpha=0.2, label="3: 90% bootstrap")
      d_axis.fill_between(flops, *d_band, color="tab:green", alpha=0.2, label="3: 90% bootstrap")
  for axis, name in ((n_axis, "N_opt (parameters)"), (d_axis, "D_opt (tokens)")):
    axis.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=name)
    axis.legend(fontsize=7)
  figure.suptitle("Compute-optimal allocation")
  return _save(figure, path)


def plot_loss_vs_compute(points, law: fit.Law, path, extrapolate_to=None) -> str:
  """The runs' final losses against C, and the law's loss at the compute-optimal allocation,
  drawn on to `extrapolate_to` FLOPs."""
  figure, (axis,) = _figure()
  flops, n, loss = (_column(points, k) for k in ("flops", "n", "loss"))
  top = max(flops.max(), extrapolate_to or 0.0)
  c = np.geomspace(flops.min() / 2, top, 120)
  shown = axis.scatter(flops, loss, c=np.log10(n), s=18, cmap="viridis", label="runs")
  figure.colorbar(shown, ax=axis, label="log10 N")
  axis.plot(c, law.predict(c), color="black", lw=1, label="law at the compute-optimal N, D")
  if extrapolate_to:
    axis.axvline(flops.max(), color="gray", ls=":", lw=1)
    axis.scatter([extrapolate_to], [law.predict(extrapolate_to)], marker="*", s=120,
                 color="tab:red", label=f"predicted at {extrapolate_to:.2g}")
  axis.set(xscale="log", xlabel="training FLOPs C", ylabel="final loss",
           title="Loss against compute")
  axis.legend(fontsize=7)
  return _save(figure, path)
