"""Scaling-law fits: the three approaches of Hoffmann et al. 2022 ("Training Compute-Optimal
Large Language Models", Chinchilla), estimated as in Besiroglu et al. 2024 ("Chinchilla
Scaling: A replication attempt", Epoch AI).

Approach 1, `fit_envelope`: the lower envelope of training curves over FLOPs.
Approach 2, `fit_isoflops`: a parabola in ln N per FLOP budget; its minima give N_opt(C).
Approach 3, `fit_law`: L(N, D) = E + A / N^alpha + B / D^beta by a Huber loss on log-loss
residuals, L-BFGS-B from a grid of starts, bootstrap percentile intervals.

numpy and scipy only (no jax), so a sweep's results can be analysed anywhere.
"""

import contextlib
import ctypes
import dataclasses
import functools
import glob
import itertools
import os

import numpy as np
import scipy
from scipy import optimize

from llmjax.errors import UserError

_PARAMS = ("E", "A", "B", "alpha", "beta")


@dataclasses.dataclass(frozen=True)
class Law:
  """L(N, D) = E + A / N**alpha + B / D**beta for N parameters and D training tokens; along the
  compute-optimal frontier N_opt grows as C**a and D_opt as C**b."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def loss(self, n, d):
    n, d = np.asarray(n, float), np.asarray(d, float)
    return self.E + self.A / n**self.alpha + self.B / d**self.beta

  @property
  def a(self) -> float:
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    return self.alpha / (self.alpha + self.beta)

  def optimal(self, flops, k=6.0):
    """(N_opt, D_opt) minimising the loss subject to flops = k N D. Setting dL/dN = 0 along
    D = C / (k N) gives N**(alpha + beta) = (alpha A / (beta B)) (C / k)**beta."""
    if not (self.alpha > 0 and self.beta > 0):
      raise UserError(f"the law has alpha={self.alpha}, beta={self.beta}; a compute-optimal "
                      "allocation needs both exponents positive: refit with more varied N and D")
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
    c = np.asarray(flops, float) / k
    return g * c**self.a, c**self.b / g

  def tokens_per_param(self, flops, k=6.0):
    n_opt, d_opt = self.optimal(flops, k)
    return d_opt / n_opt

  def predict(self, flops, k=6.0):
    """The loss at the compute-optimal allocation of `flops`."""
    return self.loss(*self.optimal(flops, k))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "Law":
    missing = [p for p in _PARAMS if p not in values]
    if missing:
      raise UserError(f"a scaling law needs the keys {list(_PARAMS)}; {missing} are missing")
    return cls(**{p: float(values[p]) for p in _PARAMS})


CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al., Approach 3
EPOCH = Law(E=1.817, A=482.0, B=2085.4, alpha=0.3478, beta=0.3658)  # Besiroglu et al. 2024
PUBLISHED = {"chinchilla": CHINCHILLA, "epoch": EPOCH}


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = coef * x ** exponent."""
  coef: float
  exponent: float

  def __call__(self, x):
    return self.coef * np.asarray(x, float) ** self.exponent


def fit_power_law(x, y) -> PowerLaw:
  """Least squares in log-log."""
  x, y = _positive("x", x), _positive("y", y, len(x))
  if len(np.unique(x)) < 2:
    raise UserError(f"a power law needs at least 2 distinct x values; got {np.unique(x)}")
  exponent, log_coef = np.polyfit(np.log(x), np.log(y), 1)
  return PowerLaw(float(np.exp(log_coef)), float(exponent))


def _positive(name, values, length=None):
  """`values` as a 1-D float array, every entry positive and finite (the fits take logs)."""
  values = np.atleast_1d(np.asarray(values, float))
  if values.ndim != 1 or (length is not None and len(values) != length):
    raise UserError(f"{name} must be a 1-D sequence of {length or 'some'} numbers; got shape "
                    f"{values.shape}: pass one value per run")
  bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
  if len(bad):
    raise UserError(f"{name}[{bad[0]}] = {values[bad[0]]} is not a positive finite number; "
                    "scaling fits take logarithms: fix or drop that run")
  return values


# ---------------------------------------------------------------- Approach 3: parametric fit

# The starts of Hoffmann et al.'s Approach 3, in the order (e, a, b, alpha, beta) with e = ln E,
# a = ln A, b = ln B: 4,500 starts, 25-45 s for 50 points on a busy 2-core CPU (measured).
HOFFMANN_GRID = {"e": [-1, -0.5, 0, 0.5, 1], "a": [0, 5, 10, 15, 20, 25],
                 "b": [0, 5, 10, 15, 20, 25], "alpha": [0, 0.5, 1, 1.5, 2],
                 "beta": [0, 0.5, 1, 1.5, 2]}
# The default: the same span at half the density, 243 starts (2 s against 33 s for 50 points,
# measured). With the tolerances of `_best_fit` about 40% of Hoffmann's starts reach the best
# optimum, and this grid found the Hoffmann grid's optimum on every synthetic sweep tried.
DEFAULT_GRID = {"e": [-1, 0, 1], "a": [0, 10, 20], "b": [0, 10, 20], "alpha": [0, 0.5, 1],
                "beta": [0, 0.5, 1]}
# 18 starts, for bootstrap-heavy uses such as calibration studies.
COARSE_GRID = {"e": [0, 1], "a": [0, 10, 20], "b": [0, 10, 20], "alpha": [0.5], "beta": [0.5]}


def _grid_points(grid) -> np.ndarray:
  if isinstance(grid, dict):
    keys = ("e", "a", "b", "alpha", "beta")
    if set(grid) != set(keys):
      raise UserError(f"a grid dict needs exactly the keys {keys}; got {sorted(grid)}")
    grid = list(itertools.product(*(grid[k] for k in keys)))
  points = np.asarray(grid, float)
  if points.ndim != 2 or points.shape[1] != 5 or not len(points):
    raise UserError("a grid is a dict of 5 lists or a list of (e, a, b, alpha, beta) tuples; "
                    f"got an array of shape {points.shape}")
  return points


def _huber_and_grad(theta, x1, x2, y, delta):
  """The summed Huber loss of log L_hat - log L, log L_hat = LSE(a - alpha x1, b - beta x2, e),
  and its gradient in (e, a, b, alpha, beta)."""
  e, a, b, alpha, beta = theta
  t1, t2 = a - alpha * x1, b - beta * x2
  m = np.maximum(np.maximum(t1, t2), e)  # shift so the exponentials cannot overflow
  w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
  total = w1 + w2 + w3
  r = m + np.log(total) - y
  clipped = np.clip(r, -delta, delta)  # dHuber/dr; and Huber(r) = clipped * (r - clipped / 2)
  g = clipped / total
  g1, g2 = g * w1, g * w2
  grad = np.array([g @ w3, g1.sum(), g2.sum(), -(g1 @ x1), -(g2 @ x2)])
  return clipped @ (r - 0.5 * clipped), grad


def huber_objective(law: Law, n, d, loss, delta=1e-3) -> float:
  """The summed Huber loss `fit_law` minimises, at `law`'s parameters."""
  n, d, loss = _validated(n, d, loss)
  theta = [np.log(law.E), np.log(law.A), np.log(law.B), law.alpha, law.beta]
  return float(_huber_and_grad(theta, np.log(n), np.log(d), np.log(loss), delta)[0])


def _validated(n, d, loss):
  return _positive("n", n), _positive("d", d, np.size(n)), _positive("loss", loss, np.size(n))


@functools.cache
def _scipy_openblas():
  """scipy's bundled OpenBLAS (wheels ship one in scipy.libs or scipy/.dylibs), or None."""
  root = os.path.dirname(scipy.__file__)
  for path in glob.glob(os.path.join(root + ".libs", "libscipy_openblas*")) + glob.glob(
      os.path.join(root, ".dylibs", "libscipy_openblas*")):
    with contextlib.suppress(OSError, AttributeError):
      lib = ctypes.CDLL(path)
      lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
      lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
      return lib
  return None


@contextlib.contextmanager
def _one_blas_thread():
  """L-BFGS-B calls LAPACK on matrices of a few rows thousands of times per fit; OpenBLAS
  threading those calls made a grid fit 18x slower on a busy 2-core machine (measured), so
  scipy's OpenBLAS runs on one thread during a fit (process-wide) and is restored after."""
  lib = _scipy_openblas()
  if lib is None:
    yield
    return
  before = lib.scipy_openblas_get_num_threads()
  lib.scipy_openblas_set_num_threads(1)
  try:
    yield
  finally:
    lib.scipy_openblas_set_num_threads(before)


def _best_fit(data, delta, starts):
  """L-BFGS-B from every start; the lowest objective wins. The objective is a SUM over points:
  Besiroglu et al. found that Hoffmann et al.'s mean made the loss so small that L-BFGS met
  its tolerance and stopped before converging. For the same reason ftol and gtol are tightened:
  L-BFGS-B's ftol is relative to max(|f|, 1), i.e. absolute for objectives of ~1e-4, and with
  the defaults 5% of Hoffmann's starts reached the best optimum of a synthetic sweep, against
  40% with these."""
  best_theta, best_value = None, np.inf
  for start in starts:
    result = optimize.minimize(_huber_and_grad, start, args=(*data, delta), jac=True,
                               method="L-BFGS-B",
                               options={"ftol": 1e-14, "gtol": 1e-12, "maxiter": 2000})
    if np.isfinite(result.fun) and result.fun < best_value:
      best_theta, best_value = result.x, float(result.fun)
  if best_theta is None:
    raise UserError("no start of the grid reached a finite objective: check the losses' scale "
                    "or pass a grid nearer the expected parameters")
  return best_theta, best_value


def _law_from(theta) -> Law:
  e, a, b, alpha, beta = (float(v) for v in theta)
  return Law(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


@dataclasses.dataclass(frozen=True)
class LawFit:
  """A fitted law, its summed Huber objective and bootstrap percentile intervals."""
  law: Law
  objective: float
  n_points: int
  intervals: dict  # name -> (lo, hi) for E, A, B, alpha, beta, a, b; empty without bootstrap
  samples: dict  # name -> np.ndarray of bootstrap estimates

  def to_dict(self) -> dict:
    return {"law": self.law.to_dict(), "objective": self.objective, "n_points": self.n_points,
            "intervals": {k: [float(lo), float(hi)] for k, (lo, hi) in self.intervals.items()},
            "samples": {k: np.asarray(v).tolist() for k, v in self.samples.items()}}


def fit_law(n, d, loss, *, delta=1e-3, grid=None, bootstrap=0, confidence=0.9, seed=0) -> LawFit:
  """Approach 3: fit L(N, D) to final losses by Huber loss (delta) on log residuals, from every
  start of `grid` (default DEFAULT_GRID); `bootstrap` resamples give percentile intervals."""
  n, d, loss = _validated(n, d, loss)
  if len(n) < 6:
    raise UserError(f"fit_law got {len(n)} points but needs at least 6 (5 parameters + 1): "
                    "add runs with other model sizes or token counts")
  if not 0 < confidence < 1:
    raise UserError(f"confidence={confidence} must lie strictly between 0 and 1, e.g. 0.9")
  data = (np.log(n), np.log(d), np.log(loss))
  starts = _grid_points(DEFAULT_GRID if grid is None else grid)
  with _one_blas_thread():
    theta, value = _best_fit(data, delta, starts)
    samples = _bootstrap(data, delta, theta, starts, bootstrap, seed)
  tail = 50 * (1 - confidence)
  intervals = {k: (float(np.nanpercentile(v, tail)), float(np.nanpercentile(v, 100 - tail)))
               for k, v in samples.items()}
  return LawFit(_law_from(theta), value, len(n), intervals, samples)


def _bootstrap(data, delta, theta, starts, repeats, seed) -> dict:
  """Refit `repeats` resamples of the points. Each refit starts at the full fit's optimum (a
  resample's optimum is near it) plus 3 random grid points as a guard against a basin change;
  the whole grid per resample would cost `repeats` times a full fit."""
  if not repeats:
    return {}
  rng = np.random.default_rng(seed)
  num_points = len(data[0])
  rows = []
  for _ in range(repeats):
    idx = rng.integers(0, num_points, num_points)
    extra = starts[rng.choice(len(starts), min(3, len(starts)), replace=False)]
    refit, _ = _best_fit(tuple(x[idx] for x in data), delta, np.vstack([theta, extra]))
    rows.append(refit)
  e, a, b, alpha, beta = np.asarray(rows).T
  with np.errstate(divide="ignore", invalid="ignore"):  # alpha + beta = 0 gives NaN, not a crash
    columns = (np.exp(e), np.exp(a), np.exp(b), alpha, beta, beta / (alpha + beta),
               alpha / (alpha + beta))
  return dict(zip(_PARAMS + ("a", "b"), columns))


# ---------------------------------------------------------------- Approach 2: IsoFLOP profiles

@dataclasses.dataclass(frozen=True)
class IsoflopFit:
  """Per budget: dict(flops, coeffs (c2, c1, c0) of loss = c2 x^2 + c1 x + c0 in x = ln N,
  n_opt, d_opt, loss_opt, n_points, extrapolated); and the power laws through the minima."""
  budgets: list
  n_opt: PowerLaw
  d_opt: PowerLaw

  def to_dict(self) -> dict:
    return {"budgets": [dict(b, coeffs=list(b["coeffs"])) for b in self.budgets],
            "n_opt": dataclasses.asdict(self.n_opt), "d_opt": dataclasses.asdict(self.d_opt)}


def _isoflop_budget(flops, n, loss, k) -> dict:
  """The least-squares parabola in ln N through one budget's runs, and its minimum."""
  if len(np.unique(n)) < 3:
    raise UserError(f"the budget C={flops:.4g} has {len(np.unique(n))} distinct model sizes; a "
                    "parabola in ln N needs at least 3: add runs of other sizes at this budget")
  x = np.log(n)
  centre = x.mean()  # fit in x - mean(x): the Vandermonde matrix in raw ln N is ill-conditioned
  q2, q1, q0 = np.polyfit(x - centre, loss, 2)
  if not q2 > 0:
    raise UserError(f"the runs at budget C={flops:.4g} do not bracket a minimum (the parabola "
                    "in ln N opens downward): add smaller and larger models at this budget")
  x_opt = centre - q1 / (2 * q2)
  n_opt = float(np.exp(x_opt))
  coeffs = (float(q2), float(q1 - 2 * q2 * centre), float(q0 - q1 * centre + q2 * centre**2))
  return {"flops": float(flops), "coeffs": coeffs, "n_opt": n_opt, "d_opt": flops / (k * n_opt),
          "loss_opt": float(q0 - q1**2 / (4 * q2)), "n_points": len(n),
          "extrapolated": not n.min() <= n_opt <= n.max()}


def fit_isoflops(flops, n, loss, *, k=6.0) -> IsoflopFit:
  """Approach 2: runs sharing a `flops` value form one budget's profile (pass each run's
  nominal budget); each profile's minimum gives (C, N_opt), and power laws go through them."""
  flops = _positive("flops", flops)
  n, loss = _positive("n", n, len(flops)), _positive("loss", loss, len(flops))
  budgets = [_isoflop_budget(c, n[flops == c], loss[flops == c], k) for c in np.unique(flops)]
  if len(budgets) < 2:
    raise UserError(f"fit_isoflops got {len(budgets)} FLOP budget(s) but needs at least 2 to "
                    "fit N_opt(C): run the sweep at more budgets")
  c = [b["flops"] for b in budgets]
  return IsoflopFit(budgets, fit_power_law(c, [b["n_opt"] for b in budgets]),
                    fit_power_law(c, [b["d_opt"] for b in budgets]))


# ---------------------------------------------------------------- Approach 1: envelope

@dataclasses.dataclass(frozen=True)
class EnvelopeFit:
  """The lower envelope of the training curves (one point per FLOP bin) and power laws."""
  flops: np.ndarray
  n_opt: np.ndarray
  d_opt: np.ndarray
  loss: np.ndarray
  n_opt_law: PowerLaw
  d_opt_law: PowerLaw

  def to_dict(self) -> dict:
    return {"flops": self.flops.tolist(), "n_opt": self.n_opt.tolist(),
            "d_opt": self.d_opt.tolist(), "loss": self.loss.tolist(),
            "n_opt_law": dataclasses.asdict(self.n_opt_law),
            "d_opt_law": dataclasses.asdict(self.d_opt_law)}


def _curve(index, curve):
  """(n, flops, tokens, loss) of one training run, checked."""
  missing = {"n", "flops", "tokens", "loss"} - set(curve)
  if missing:
    raise UserError(f"curve {index} lacks {sorted(missing)}: each curve is a dict of n, flops, "
                    "tokens and loss")
  flops = _positive(f"curves[{index}]['flops']", curve["flops"])
  if len(flops) < 2 or np.any(np.diff(flops) <= 0):
    raise UserError(f"curves[{index}]['flops'] must increase strictly over at least 2 logged "
                    "steps: pass the cumulative FLOPs at each logged step")
  tokens = _positive(f"curves[{index}]['tokens']", curve["tokens"], len(flops))
  loss = _positive(f"curves[{index}]['loss']", curve["loss"], len(flops))
  return float(_positive(f"curves[{index}]['n']", curve["n"], 1)[0]), flops, tokens, loss


def fit_envelope(curves, *, num_bins=20) -> EnvelopeFit:
  """Approach 1: at `num_bins` log-spaced FLOP values, the run with the lowest loss (each run's
  loss interpolated in ln C, only inside its own FLOP range) gives (C, N_opt, D_opt, loss)."""
  runs = [_curve(i, c) for i, c in enumerate(curves)]
  if not runs or num_bins < 2:
    raise UserError(f"fit_envelope needs training curves and num_bins >= 2; got {len(runs)} "
                    f"curves and num_bins={num_bins}")
  grid = np.geomspace(min(r[1][0] for r in runs), max(r[1][-1] for r in runs), num_bins)
  rows = []
  for c in grid:
    inside = [r for r in runs if r[1][0] <= c <= r[1][-1]]
    if inside:
      at_c = [np.interp(np.log(c), np.log(f), loss) for _, f, _, loss in inside]
      n, f, tokens, _ = inside[int(np.argmin(at_c))]
      rows.append((c, n, np.interp(c, f, tokens), min(at_c)))
  flops, n_opt, d_opt, loss = (np.array(col) for col in zip(*rows))
  if len(np.unique(n_opt)) < 2:
    raise UserError(f"the envelope is one model (N={n_opt[0]:.4g} wins every FLOP bin): train "
                    "more model sizes so that the envelope changes hands")
  return EnvelopeFit(flops, n_opt, d_opt, loss, fit_power_law(flops, n_opt),
                     fit_power_law(flops, d_opt))


def summary(law: Law, flops_list, k=6.0) -> list:
  """Rows of dict(flops, n_opt, d_opt, tokens_per_param, loss) at each compute budget."""
  rows = []
  for c in flops_list:
    n_opt, d_opt = law.optimal(c, k)
    rows.append({"flops": float(c), "n_opt": float(n_opt), "d_opt": float(d_opt),
                 "tokens_per_param": float(d_opt / n_opt), "loss": float(law.loss(n_opt, d_opt))})
  return rows
