"""Scaling-law fits for the report: a power law in compute and the isoFLOP parabola.

Power law (Hoffmann et al. 2022 "Chinchilla", Approach 3; Besiroglu et al. 2024, the Epoch AI
replication): the loss reached with training compute ``C`` is

    L(C) = E + A · C^(−α)

fitted by minimising the Huber loss (δ = 1e-3) of ``log L̂(C) − log L`` over the runs, with
``E = exp(e)``, ``A = exp(a)`` so both stay positive and ``log L̂ = logsumexp(e, a − α log C)``.
The objective is evaluated on a grid of 96 initialisations (E, A scaled to the observed losses, α
from 0.05 to 2); L-BFGS-B (``scipy.optimize.minimize``) starts from the best ``n_starts`` of them
(all 96 when asked) and the best optimum is kept. Numerical choices (they do not change the minimiser):

- ``log C`` is centred on the geometric mean of the budgets, so ``a`` is the reducible loss at that
  budget rather than a number near 40 for C ≈ 1e18; ``A`` is converted back to raw FLOPs units.
- The objective is divided by δ², so it is O(1) rather than O(1e-6): L-BFGS-B's stopping rule
  compares changes of the objective with max(|f|, 1) and would otherwise stop almost at once.
- BLAS runs single-threaded during the fit: L-BFGS-B's tiny BLAS calls were ~10× slower with
  OpenBLAS's threads on a busy 2-core machine.

The 95% interval of α is a percentile bootstrap over runs: resample the (C, L) points with
replacement, refit (warm-started from the full-data optimum), take the 2.5 / 97.5 percentiles. Each
resample's law is kept (``PowerLawFit.draws``), so the loss at any budget — a common one inside the
data, or 10× beyond it — gets the same kind of interval (``loss_ci``), and two independently fitted
series' draws, paired in order, give an interval of their difference (``difference_ci``).
Fewer than ``MIN_POINTS`` distinct budgets give no fit (``None``).

IsoFLOP (Chinchilla Approach 2): at one budget, loss against ``log N`` is a parabola; its vertex is
the compute-optimal size ``N*``. Over several budgets ``N* = k · C^b`` is a straight line in log-log.

Tested by ``tests/test_fit.py``:

    PYTHONPATH=. python -m pytest -q -n 0 tests/test_fit.py
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Sequence

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
MIN_POINTS = 3  # three parameters: fewer distinct budgets leave the law undetermined

# Chinchilla's grid is over raw (e, a, α); ours is over the centred parametrisation, scaled to the data.
ALPHA_GRID = (0.05, 0.15, 0.3, 0.6, 1.0, 2.0)
E_FRACTIONS = (0.01, 0.3, 0.6, 0.9)          # E as a fraction of the smallest loss
A_FRACTIONS = (0.03, 0.3, 1.0, 3.0)          # A (at the centre budget) as a fraction of the largest loss


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """``L(C) = E + A · C^(−α)`` with C in raw FLOPs; ``*_ci`` are bootstrap percentile intervals."""
  E: float
  A: float
  alpha: float
  n: int                                   # runs fitted
  objective: float                         # Huber objective at the optimum (÷ δ²)
  alpha_ci: tuple[float, float] | None = None
  E_ci: tuple[float, float] | None = None
  n_bootstrap: int = 0                     # resamples that produced a fit
  draws: tuple[tuple[float, float, float], ...] = ()  # (E, A, α) of each of those resamples
  ci: float = 0.95

  def predict(self, compute) -> np.ndarray:
    return self.E + self.A * np.asarray(compute, dtype=np.float64) ** (-self.alpha)

  def predict_draws(self, compute: float) -> np.ndarray:
    """The loss at ``compute`` under each bootstrap resample's law: ``[n_bootstrap]``."""
    if not self.draws:
      return np.zeros(0)
    e, a, alpha = np.asarray(self.draws, dtype=np.float64).T
    return e + a * float(compute) ** (-alpha)

  def loss_ci(self, compute: float) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the loss at ``compute`` (inside or beyond the fitted budgets)."""
    return percentile_interval(self.predict_draws(compute), self.ci)


def percentile_interval(values, ci: float = 0.95) -> tuple[float, float] | None:
  """The central ``ci`` percentile interval of ``values``; ``None`` with fewer than 10 of them."""
  values = np.asarray(values, dtype=np.float64)
  if len(values) < 10:
    return None
  return tuple(float(p) for p in np.percentile(values, (100 * (1 - ci) / 2, 100 * (1 + ci) / 2)))


def _objective(theta: np.ndarray, x: np.ndarray, log_loss: np.ndarray, delta: float):
  """Huber objective (÷ δ², see the module docstring) and its gradient in θ = (e, a, α).

  ``x`` = centred log compute; ``log L̂ = logsumexp(e, a − α x)``.
  """
  e, a, alpha = theta
  z2 = a - alpha * x
  pred = np.logaddexp(e, z2)
  w2 = np.exp(z2 - pred)  # d pred / da; d pred / de = 1 − w2 (softmax weights)
  r = pred - log_loss
  absr = np.abs(r)
  value = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum() / delta**2
  g = np.clip(r, -delta, delta) / delta**2
  gw2 = g * w2
  return float(value), np.array([g.sum() - gw2.sum(), gw2.sum(), -(gw2 @ x)])


def _grid(loss: np.ndarray) -> np.ndarray:
  lo, hi = float(np.min(loss)), float(np.max(loss))
  return np.array([(math.log(lo * fe), math.log(hi * fa), al)
                   for fe, fa, al in itertools.product(E_FRACTIONS, A_FRACTIONS, ALPHA_GRID)])


def _minimise(starts: np.ndarray, x: np.ndarray, log_loss: np.ndarray, delta: float):
  best = None
  for theta0 in starts:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # exp overflow on wild line-search probes
      res = optimize.minimize(_objective, theta0, args=(x, log_loss, delta), jac=True, method="L-BFGS-B",
                              bounds=[(None, None), (None, None), (0.0, 10.0)],
                              options={"maxiter": 500, "ftol": 1e-14, "gtol": 1e-10})
    if np.all(np.isfinite(res.x)) and np.isfinite(res.fun) and (best is None or res.fun < best.fun):
      best = res
  return best


def _best_starts(grid: np.ndarray, x: np.ndarray, log_loss: np.ndarray, delta: float, k: int) -> np.ndarray:
  """The ``k`` grid points with the lowest objective (the bootstrap refits only from these)."""
  values = [_objective(theta, x, log_loss, delta)[0] for theta in grid]
  return grid[np.argsort(values)[:k]]


def fit_power_law(compute: Sequence[float], loss: Sequence[float], *, delta: float = HUBER_DELTA,
                  n_starts: int = 8, n_bootstrap: int = 200, ci: float = 0.95,
                  seed: int = 0) -> PowerLawFit | None:
  """Fit ``L(C) = E + A · C^(−α)``; ``None`` if fewer than ``MIN_POINTS`` distinct budgets.

  ``compute``, ``loss``: one entry per run (non-finite or non-positive entries are dropped).
  ``n_starts``: L-BFGS-B runs from this many best points of the initialisation grid (all of them
  when ``n_starts >= len(grid)``). ``n_bootstrap = 0`` skips the interval.
  """
  with threadpool_limits(limits=1, user_api="blas"):
    return _fit_power_law(compute, loss, delta=delta, n_starts=n_starts, n_bootstrap=n_bootstrap, ci=ci,
                          seed=seed)


def _fit_power_law(compute, loss, *, delta, n_starts, n_bootstrap, ci, seed) -> PowerLawFit | None:
  c = np.asarray(compute, dtype=np.float64)
  l = np.asarray(loss, dtype=np.float64)
  keep = np.isfinite(c) & np.isfinite(l) & (c > 0) & (l > 0)
  c, l = c[keep], l[keep]
  if len(np.unique(c)) < MIN_POINTS:
    return None
  log_c0 = float(np.mean(np.log(c)))
  x, log_loss = np.log(c) - log_c0, np.log(l)
  grid = _grid(l)
  best = _minimise(_best_starts(grid, x, log_loss, delta, k=n_starts), x, log_loss, delta)
  if best is None:
    return None
  e, a, alpha = best.x
  to_raw = lambda a_, alpha_: math.exp(a_ + alpha_ * log_c0)  # A' · (C/C0)^-α = (A' C0^α) · C^-α

  alphas, es, draws = [], [], []
  rng = np.random.default_rng(seed)
  for _ in range(n_bootstrap):
    idx = rng.integers(0, len(c), size=len(c))
    if len(np.unique(c[idx])) < MIN_POINTS:
      continue
    xb, lb = x[idx], log_loss[idx]
    res = _minimise(best.x[None], xb, lb, delta)  # resamples lie near the data: warm start
    if res is not None:
      es.append(math.exp(res.x[0]))
      alphas.append(res.x[2])
      draws.append((es[-1], to_raw(res.x[1], res.x[2]), float(res.x[2])))
  return PowerLawFit(E=math.exp(e), A=to_raw(a, alpha), alpha=float(alpha), n=len(c), objective=float(best.fun),
                     alpha_ci=percentile_interval(alphas, ci), E_ci=percentile_interval(es, ci),
                     n_bootstrap=len(alphas), draws=tuple(draws), ci=ci)


def difference_ci(first: PowerLawFit, second: PowerLawFit, compute: float,
                  ci: float = 0.95) -> tuple[float, tuple[float, float] | None]:
  """``L_first(C) − L_second(C)`` at ``compute`` and its bootstrap interval.

  The two fits resample different runs independently, so pairing their draws in order samples
  the difference of two independent estimates; ``None`` for the interval when either has < 10 draws.
  """
  point = float(first.predict(compute) - second.predict(compute))
  a, b = first.predict_draws(compute), second.predict_draws(compute)
  n = min(len(a), len(b))
  return point, percentile_interval(a[:n] - b[:n], ci)


# ----------------------------------------------------------------------------- isoFLOP


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
  """Loss at one budget as ``c2·u² + c1·u + c0`` in ``u = log N``; its vertex is the optimum."""
  coeffs: tuple[float, float, float]       # (c2, c1, c0), highest power first (np.polyval order)
  n_opt: float                             # compute-optimal non-embedding params
  loss_opt: float
  n: int

  def predict(self, params) -> np.ndarray:
    return np.polyval(self.coeffs, np.log(np.asarray(params, dtype=np.float64)))


def fit_isoflop(params: Sequence[float], loss: Sequence[float]) -> IsoFlopFit | None:
  """Parabola of loss against ``log params`` at one budget; ``None`` without ≥ 3 sizes or a minimum."""
  n = np.asarray(params, dtype=np.float64)
  l = np.asarray(loss, dtype=np.float64)
  keep = np.isfinite(n) & np.isfinite(l) & (n > 0)
  n, l = n[keep], l[keep]
  if len(np.unique(n)) < 3:
    return None
  c2, c1, c0 = np.polyfit(np.log(n), l, 2)
  if c2 <= 0:  # no interior minimum: the budget's sizes are all on one side of the optimum
    return None
  u = -c1 / (2 * c2)
  return IsoFlopFit(coeffs=(float(c2), float(c1), float(c0)), n_opt=float(math.exp(u)),
                    loss_opt=float(np.polyval((c2, c1, c0), u)), n=len(n))


def fit_loglog_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
  """``y = k · x^b`` by least squares in log-log; ``(k, b)``, or ``None`` with < 2 distinct x."""
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if len(np.unique(x)) < 2:
    return None
  b, log_k = np.polyfit(np.log(x), np.log(y), 1)
  return float(math.exp(log_k)), float(b)


def group_budgets(compute: Sequence[float], rel_tol: float = 0.25) -> list[int]:
  """Cluster budgets: runs meant for one budget differ a little in analytic FLOPs across mixers.

  Returns a cluster index per entry (clusters ordered by compute): sorted budgets start a new
  cluster when more than ``1 + rel_tol`` times the cluster's smallest.
  """
  c = np.asarray(compute, dtype=np.float64)
  order = np.argsort(c)
  labels = [0] * len(c)
  cluster, first = -1, None
  for i in order:
    if first is None or c[i] > first * (1 + rel_tol):
      cluster, first = cluster + 1, c[i]
    labels[i] = cluster
  return labels
