"""The unbiased pass@k estimator (Chen et al. 2021) and a bootstrap interval over tasks."""
from __future__ import annotations

from math import comb

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(results: dict[int, tuple[int, int]], k: int) -> float:
    """pass@k averaged over tasks; results maps task id to (samples, correct)."""
    if not results:
        raise ValueError("no tasks")
    return float(np.mean([pass_at_k(n, c, k) for n, c in results.values()]))


def bootstrap_interval(results: dict[int, tuple[int, int]], k: int, *, resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean pass@k, resampling tasks."""
    scores = np.array([pass_at_k(n, c, k) for n, c in results.values()])
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_difference(a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]], k: int, *,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean pass@k of a minus b over the same tasks, with a percentile bootstrap 95% interval (tasks resampled
    together, so the pairing is kept)."""
    tasks = sorted(a)
    diff = np.array([pass_at_k(*a[t], k) - pass_at_k(*b[t], k) for t in tasks])
    means = diff[np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
