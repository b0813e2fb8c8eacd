"""Self-distillation with ground-truth weight alpha in kernel ridge regression (Borup & Andersen
2021, following Mobahi et al. 2020), exactly as the source's `toy_example.ipynb`
(papers/05_self_distillation.md §E.1).

Step t fits KRR to the mixed targets alpha*y + (1-alpha)*yhat(t-1), where yhat(t-1) are the previous
model's outputs on the training inputs and yhat(0) = y. Everything is float64 numpy; the iterative
procedure and the closed forms below agree to ~1e-15 (tests/test_krr.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import validate

# The source notebook's data (described there as Mobahi et al.'s); np.random.seed(7) in the notebook
# does NOT regenerate these values, so they are carried over as data.
X_TRAIN = np.arange(0, 1.1, 0.1)
Y_TRAIN = np.array([
    0.38476636465198066, 1.2333967683416893, 1.33232242218057, 0.69201594888895180,
    -0.29756145531871736, -0.24189291901377769, -0.7964485769175675, -0.9616480167034174,
    -0.49672509509916934, -0.3469066003991437, 0.5589512650600734,
])
X_GRID = np.arange(0, 1.01, 0.01)


def true_function(x: np.ndarray) -> np.ndarray:
    return np.sin(2 * np.pi * x)


def rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    return np.exp(-gamma * (a[:, None] - b[None, :]) ** 2)


def _check(alpha: float, gamma: float, lam: float, steps: int) -> None:
    validate.unit_interval("alpha", alpha)
    validate.positive("gamma", gamma)
    validate.positive("lam", lam)
    validate.positive_int("steps", steps)


@dataclass
class SelfDistillationKRR:
    """Per-step results for one alpha (index 0 = step 1)."""

    alpha: float
    coefs: list[np.ndarray]          # dual coefficients c(t)
    train_outputs: list[np.ndarray]  # yhat(t) = K c(t)
    curves: list[np.ndarray]         # f_t on the evaluation grid
    losses: list[float]              # mean over the grid of (f_t - sin 2 pi x)^2
    limit_curve: np.ndarray          # f_inf
    limit_loss: float


def self_distill(alpha: float, *, gamma: float = 80.0, lam: float = 0.2, steps: int = 6,
                 x: np.ndarray = X_TRAIN, y: np.ndarray = Y_TRAIN, grid: np.ndarray = X_GRID) -> SelfDistillationKRR:
    """The procedure as implemented: refit KRR to alpha*y + (1-alpha)*previous outputs, `steps` times."""
    _check(alpha, gamma, lam, steps)
    K = rbf_kernel(x, x, gamma)
    k_grid = rbf_kernel(grid, x, gamma)
    R = np.linalg.inv(K + lam * np.eye(len(x)))
    target_fn = true_function(grid)
    coefs, outs, curves, losses = [], [], [], []
    prev = y
    for _ in range(steps):
        c = R @ (alpha * y + (1 - alpha) * prev)
        prev = K @ c
        f = k_grid @ c
        coefs.append(c), outs.append(prev), curves.append(f)
        losses.append(float(np.mean((f - target_fn) ** 2)))
    limit = limit_curve(alpha, gamma=gamma, lam=lam, x=x, y=y, grid=grid)
    return SelfDistillationKRR(alpha, coefs, outs, curves, losses, limit, float(np.mean((limit - target_fn) ** 2)))


def limit_curve(alpha: float, *, gamma: float = 80.0, lam: float = 0.2, x: np.ndarray = X_TRAIN,
                y: np.ndarray = Y_TRAIN, grid: np.ndarray = X_GRID) -> np.ndarray:
    """f_inf: plain KRR with ridge lam/alpha for alpha > 0; identically 0 for alpha = 0."""
    _check(alpha, gamma, lam, 1)
    if alpha == 0:
        return np.zeros_like(grid)
    K = rbf_kernel(x, x, gamma)
    return rbf_kernel(grid, x, gamma) @ np.linalg.solve(K + (lam / alpha) * np.eye(len(x)), y)


def eigen(gamma: float = 80.0, x: np.ndarray = X_TRAIN) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors of the training kernel matrix."""
    d, V = np.linalg.eigh(rbf_kernel(x, x, gamma))
    order = np.argsort(d)[::-1]
    return d[order], V[:, order]


def b_diagonal(alpha: float, t: int | float, *, gamma: float = 80.0, lam: float = 0.2,
               x: np.ndarray = X_TRAIN) -> np.ndarray:
    """Closed-form diagonal of B(t), yhat(t) = V B(t) V^T y; t = np.inf gives the limit.

    B(t)_kk = a^t (1-alpha)^(t-1) + alpha a sum_{j<t-1} ((1-alpha) a)^j,  a = d/(d+lam);
    B(inf) = alpha d / (alpha d + lam)."""
    validate.unit_interval("alpha", alpha)
    d, _ = eigen(gamma, x)
    a = d / (d + lam)
    if t == np.inf:
        return np.zeros_like(d) if alpha == 0 else alpha * d / (alpha * d + lam)
    validate.positive_int("t", int(t))
    t = int(t)
    geom = sum(((1 - alpha) * a) ** j for j in range(t - 1))
    return a ** t * (1 - alpha) ** (t - 1) + alpha * a * geom


def b_ratios(b: np.ndarray) -> np.ndarray:
    """R_k = B_kk / B_(k+1)(k+1), k = 1..n-1: how much faster small-eigenvalue directions shrink."""
    return b[:-1] / b[1:]


def closed_form_outputs(alpha: float, t: int, *, gamma: float = 80.0, lam: float = 0.2,
                        x: np.ndarray = X_TRAIN, y: np.ndarray = Y_TRAIN) -> np.ndarray:
    """yhat(t) = V B(t) V^T y, for checking the iterative procedure."""
    _, V = eigen(gamma, x)
    return V @ (b_diagonal(alpha, t, gamma=gamma, lam=lam, x=x) * (V.T @ y))


def loss_table(alphas, *, gamma: float = 80.0, lam: float = 0.2, steps: int = 6):
    """Rows = steps 1..steps then 'inf'; columns = alphas. A pandas DataFrame of full-precision losses."""
    import pandas as pd

    cols = {}
    for a in alphas:
        r = self_distill(a, gamma=gamma, lam=lam, steps=steps)
        cols[f"alpha={a:g}"] = r.losses + [r.limit_loss]
    return pd.DataFrame(cols, index=[str(i) for i in range(1, steps + 1)] + ["inf"])


def check_table(alphas, gamma: float, lam: float, steps: int) -> None:
    """Parameters of the loss table, checked before anything is computed."""
    if not isinstance(alphas, (list, tuple)) or not alphas:
        validate.fail("alphas", alphas, "must be a non-empty list of numbers in [0, 1]")
    for a in alphas:
        validate.unit_interval("alphas", a)
    _check(0.0, gamma, lam, steps)
