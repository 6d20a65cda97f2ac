"""The scaling-law fits of ``launch/fit.py`` on synthetic data drawn from known laws.

    PYTHONPATH=. python -m pytest -q -n 0 tests/test_fit.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from launch import fit as fit_lib

# A Chinchilla-like law in FLOPs: the reducible loss is 2 nats at 1e15 FLOPs, α = 0.3, E = 1.5.
E_TRUE, ALPHA_TRUE = 1.5, 0.3
A_TRUE = 2.0 * 1e15**ALPHA_TRUE
COMPUTE = np.logspace(15, 19, 20)


def _law(c):
  return E_TRUE + A_TRUE * c**-ALPHA_TRUE


def test_noise_free_recovers_the_law_exactly():
  fit = fit_lib.fit_power_law(COMPUTE[::4], _law(COMPUTE[::4]), n_bootstrap=0)
  assert fit is not None and fit.n == 5 and fit.alpha_ci is None
  assert abs(fit.alpha - ALPHA_TRUE) < 1e-4
  assert abs(fit.E - E_TRUE) < 1e-4
  assert abs(math.log(fit.A / A_TRUE)) < 5e-3


def test_noisy_fit_within_tolerance_and_interval_contains_truth():
  # 1% multiplicative noise on each loss, fixed seed. Tolerances: with this noise the bootstrap
  # spread of α is ≈ ±0.02, so 0.03 is about 1.5σ of the estimator, not a tuned number. A and α
  # trade off (log A moves by log C · Δα ≈ 40 · Δα at these budgets), so A is checked through the
  # fitted curve, which is what the report plots: within 2% of the true law across the range.
  rng = np.random.default_rng(0)
  loss = _law(COMPUTE) * np.exp(rng.normal(0.0, 0.01, COMPUTE.shape))
  fit = fit_lib.fit_power_law(COMPUTE, loss, n_bootstrap=100, seed=0)
  assert fit is not None and fit.n == len(COMPUTE)
  assert abs(fit.alpha - ALPHA_TRUE) < 0.03
  assert abs(fit.E - E_TRUE) < 0.05
  assert np.max(np.abs(fit.predict(COMPUTE) / _law(COMPUTE) - 1)) < 0.02
  lo, hi = fit.alpha_ci
  assert lo < ALPHA_TRUE < hi and hi - lo < 0.2
  assert fit.E_ci[0] < E_TRUE < fit.E_ci[1]
  assert fit.n_bootstrap == 100


def test_degenerate_inputs_give_no_fit():
  assert fit_lib.fit_power_law([1e15, 1e16], [3.0, 2.5]) is None  # two points: three parameters
  assert fit_lib.fit_power_law([1e15] * 5, [3.0, 2.9, 3.1, 3.0, 2.95]) is None  # one budget
  # Non-finite / non-positive entries are dropped before counting.
  assert fit_lib.fit_power_law([1e15, 1e16, float("nan"), 1e17], [3.0, 2.5, 2.0, float("inf")]) is None
  assert fit_lib.fit_power_law([], []) is None


def test_objective_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  x = np.linspace(-4.0, 4.0, 9)
  log_loss = np.log(_law(np.exp(x) * 1e17)) + rng.normal(0, 0.002, x.shape)
  theta = np.array([0.3, 0.5, 0.4])
  _, grad = fit_lib._objective(theta, x, log_loss, 1e-3)
  eps = 1e-7
  numeric = [(fit_lib._objective(theta + eps * np.eye(3)[i], x, log_loss, 1e-3)[0]
              - fit_lib._objective(theta - eps * np.eye(3)[i], x, log_loss, 1e-3)[0]) / (2 * eps) for i in range(3)]
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-3)


def test_isoflop_vertex_and_degenerate_cases():
  n = np.geomspace(1e6, 1e8, 5)
  u_opt = math.log(1e7)
  loss = 2.0 + 0.05 * (np.log(n) - u_opt) ** 2
  fit = fit_lib.fit_isoflop(n, loss)
  assert fit is not None and fit.n == 5
  assert fit.n_opt == pytest.approx(1e7, rel=1e-6)
  assert fit.loss_opt == pytest.approx(2.0, abs=1e-9)
  np.testing.assert_allclose(fit.predict(n), loss, rtol=1e-9)
  assert fit_lib.fit_isoflop(n[:2], loss[:2]) is None           # two sizes
  assert fit_lib.fit_isoflop(n, 3.0 - 0.1 * np.log(n)) is None  # monotone: no interior minimum


def test_loglog_line_and_budget_groups():
  k, b = fit_lib.fit_loglog_line([1e18, 1e19, 1e20], [2e8 * 10**(0.5 * i) for i in range(3)])
  assert b == pytest.approx(0.5) and k * 1e18**0.5 == pytest.approx(2e8)
  assert fit_lib.fit_loglog_line([1e18, 1e18], [1.0, 2.0]) is None
  # Runs aimed at one budget differ a little in analytic FLOPs; 10× apart are different budgets.
  assert fit_lib.group_budgets([1.1e18, 1e18, 1e19, 0.95e18, 1.05e19, 1e20]) == [0, 0, 1, 0, 1, 2]


def test_loss_interval_at_a_budget_contains_the_law_and_widens_beyond_the_data():
  # Same 1% noise as above; the interval is the bootstrap's, so it must hold the true loss both at a
  # budget inside the data and at 10× the largest one, and be wider out there (extrapolation).
  rng = np.random.default_rng(0)
  loss = _law(COMPUTE) * np.exp(rng.normal(0.0, 0.01, COMPUTE.shape))
  fit = fit_lib.fit_power_law(COMPUTE, loss, n_bootstrap=100, seed=0)
  inside, beyond = 1e17, 10 * COMPUTE.max()
  widths = []
  for budget in (inside, beyond):
    lo, hi = fit.loss_ci(budget)
    assert lo < _law(budget) < hi and lo < float(fit.predict(budget)) < hi
    widths.append(hi - lo)
  assert widths[1] > widths[0]
  assert len(fit.predict_draws(inside)) == fit.n_bootstrap == 100
  assert fit_lib.fit_power_law(COMPUTE, loss, n_bootstrap=0).loss_ci(inside) is None


def test_difference_interval_separates_two_laws_and_not_a_law_from_itself():
  rng = np.random.default_rng(2)
  noisy = lambda law: law(COMPUTE) * np.exp(rng.normal(0.0, 0.005, COMPUTE.shape))
  worse = lambda c: _law(c) + 0.1  # the same law shifted up by 0.1 nats: E is 1.6
  base = fit_lib.fit_power_law(COMPUTE, noisy(_law), n_bootstrap=100, seed=0)
  shifted = fit_lib.fit_power_law(COMPUTE, noisy(worse), n_bootstrap=100, seed=1)
  again = fit_lib.fit_power_law(COMPUTE, noisy(_law), n_bootstrap=100, seed=2)
  gap, (lo, hi) = fit_lib.difference_ci(shifted, base, 1e18)
  assert 0 < lo < 0.1 < hi and lo < gap < hi
  gap, (lo, hi) = fit_lib.difference_ci(again, base, 1e18)
  assert lo < 0 < hi
