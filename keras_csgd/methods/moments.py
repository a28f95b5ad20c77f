"""`RunningMoments`: mean and covariance accumulated batch by batch."""

from __future__ import annotations

import numpy as np


class RunningMoments:
    """Running float64 mean and scatter matrix of row vectors.

    Batches are merged with the pairwise update of Chan et al. (exact in
    exact arithmetic, and without the cancellation of `E[x x^T] - m m^T`).

    Args:
        d: the length of a row.
    """

    def __init__(self, d: int):
        self.n = 0
        self.mean = np.zeros(d)
        self.scatter = np.zeros((d, d))

    def update(self, x: np.ndarray) -> None:
        """Adds the rows of `x` (`(m, d)`)."""
        x = np.asarray(x, dtype=np.float64)
        m = x.shape[0]
        if m == 0:
            return
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        delta = batch_mean - self.mean
        total = self.n + m
        self.scatter += centred.T @ centred
        self.scatter += np.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total

    def covariance(self) -> np.ndarray:
        """The population covariance (scatter / n)."""
        return self.scatter / self.n
