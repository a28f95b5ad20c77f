"""The algebra of compensation: least-squares refit and CaP ranking.

With Keras kernels `K = W^T` of shape `(d, out)` and a consumer's input
statistics `Stats(mu, Sigma)`, `least_squares` gives the refitted kernel
rows on kept entries and the bias change; `cap_rank` orders channels by
greedy forward selection under that refit (block Schur steps).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from keras_csgd.methods.compensation.statistics import Stats


def _ridge(cov: np.ndarray, ridge: float) -> float:
    """Absolute ridge: `ridge` times the mean variance (1 if all are 0)."""
    scale = float(np.mean(np.diag(cov))) if cov.size else 0.0
    return ridge * (scale if scale > 0 else 1.0)


def _spd_solve(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """`(a + eps I)^-1 b` for a covariance block `a`, by Cholesky."""
    a = a + eps * np.eye(len(a))
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), b)


def least_squares(stats: Stats, kernel: np.ndarray, kept: np.ndarray, ridge):
    """Compensated kernel rows on `kept` entries and the bias change.

    With Keras kernels `K = W^T` of shape `(d, out)`:
    `K_new = Sigma[s, s]^-1 Sigma[s, :] K` and
    `delta_b = mu K - mu[s] K_new`.
    """
    cov = stats.cov
    eps = _ridge(cov, ridge)
    k_new = _spd_solve(cov[np.ix_(kept, kept)], cov[kept] @ kernel, eps)
    delta = stats.mean @ kernel - stats.mean[kept] @ k_new
    return k_new, delta


def cross_least_squares(cov, mean, kernel, ridge):
    """Refit from other inputs: kernel rows and bias change.

    `cov` and `mean` are the joint moments of `[q, p]`, `p` the `d` inputs
    `kernel` (`(d, out)`) reads and `q` the inputs it must read instead:
    `K_new = Cov(q, q)^-1 Cov(q, p) K`, `delta_b = E[p] K - E[q] K_new`
    (with `q` a subset of `p`, this is `least_squares`).
    """
    n = len(mean) - kernel.shape[0]
    qq = cov[:n, :n]
    k_new = _spd_solve(qq, cov[:n, n:] @ kernel, _ridge(qq, ridge))
    return k_new, mean[n:] @ kernel - mean[:n] @ k_new


def per_entry(kernel_shape, values) -> np.ndarray:
    """Per-input-channel `values` repeated for every patch entry.

    A kernel `(*window, in, out)` reads its patch entries in the order
    `(*window, in)`, so entry `e` belongs to input channel `e % in`.
    """
    return np.tile(np.asarray(values), math.prod(kernel_shape[:-2]))


def cap_rank(stats, kernel, channels=None, ridge=1e-8):
    """Ranks input channels by compensation-aware greedy forward selection.

    Starting from the entries that are not candidates (channel `-1`), each
    step adds the channel whose entries most reduce the reconstruction loss
    left after least-squares compensation,

    ```
    loss(S) = tr(W Sigma W^T) - tr(B^T A^-1 B),
    A = Sigma[S, S],  B = Sigma[S, :] W^T,
    ```

    i.e. `tr(W R_S W^T)` with `R_S` the Schur complement (the covariance
    left after conditioning on the entries `S`). The gain of a channel `c`
    is `tr(G^T R_cc^-1 G)` with `G = R[c, :] W^T`, and `R` is updated by the
    block Schur step `R -= R[:, c] R_cc^-1 R[c, :]`. With several consumers
    of one channel group, the gains add up.

    Args:
        stats: the consumer's `Stats` (from `collect_statistics`), or a
            list of them (one per consumer of a channel group).
        kernel: the consumer's Keras kernel, `(*window, in, out)` for a
            convolution, `(in, out)` for a dense layer (a list, with a list
            of `stats`).
        channels: the channel each input entry (along the kernel's `in`
            axis) belongs to, `-1` for entries that are always kept (other
            channel groups); a list, with a list of `stats`. Defaults to
            `None`: entry `i` is channel `i`.
        ridge: ridge added to each solved covariance block, relative to
            the mean input variance. Defaults to `1e-8`.

    Returns:
        An int array of the candidate channels, the most important first.

    Raises:
        ValueError: if the lengths of `stats`, `kernel` and `channels`
            differ, or a kernel does not fit its statistics.

    Example:

    ```python
    stats = compensation.collect_statistics(model, x, layers=["conv2"])
    order = compensation.cap_rank(
        stats["conv2"], model.get_layer("conv2").kernel.numpy()
    )
    keep = sorted(order[:8])
    ```

    References:
        Xie et al., arXiv 2108.13728, section 3.2 (compensation-aware
        pruning).
    """
    single = isinstance(stats, Stats)
    stats_l = [stats] if single else list(stats)
    kernels = [kernel] if single else list(kernel)
    if channels is None:
        chans_l = [None] * len(stats_l)
    else:
        chans_l = [channels] if single else list(channels)
    if not len(stats_l) == len(kernels) == len(chans_l):
        raise ValueError(
            "`stats`, `kernel` and `channels` must have one entry per "
            f"consumer. Received: {len(stats_l)} stats, {len(kernels)} "
            f"kernels, {len(chans_l)} channel maps"
        )
    problems = []
    for st, k, ch in zip(stats_l, kernels, chans_l, strict=True):
        k = np.asarray(k, dtype=np.float64)
        if ch is None:
            ch = np.arange(k.shape[-2])
        entries = per_entry(k.shape, ch)
        k = k.reshape(-1, k.shape[-1])
        if k.shape[0] != len(st.mean) or len(entries) != len(st.mean):
            raise ValueError(
                "`kernel` does not fit `stats`: the kernel reads "
                f"{k.shape[0]} entries, the statistics have "
                f"{len(st.mean)}. Received: kernel.shape={k.shape}"
            )
        eps = _ridge(st.cov, ridge)
        residual = st.cov.copy()
        fixed = np.flatnonzero(entries < 0)
        if len(fixed):
            residual = _schur_step(residual, fixed, eps)
        problems.append((residual, k, entries, eps))
    candidates = sorted(
        set().union(*(set(p[2][p[2] >= 0].tolist()) for p in problems))
    )
    order = []
    while candidates:
        gains = np.zeros(len(candidates))
        for residual, k, entries, eps in problems:
            explained = residual @ k
            for j, c in enumerate(candidates):
                idx = np.flatnonzero(entries == c)
                if len(idx) == 0:
                    continue
                g = explained[idx]
                a = residual[np.ix_(idx, idx)]
                gains[j] += np.sum(g * _spd_solve(a, g, eps))
        best = candidates.pop(int(np.argmax(gains)))
        order.append(best)
        for i, (residual, k, entries, eps) in enumerate(problems):
            idx = np.flatnonzero(entries == best)
            if len(idx):
                residual = _schur_step(residual, idx, eps)
                problems[i] = (residual, k, entries, eps)
    return np.asarray(order, dtype=np.int64)


def _schur_step(r: np.ndarray, idx: np.ndarray, eps: float) -> np.ndarray:
    """`R - R[:, idx] (R[idx, idx] + eps I)^-1 R[idx, :]`."""
    cols = r[:, idx]
    return r - cols @ _spd_solve(r[np.ix_(idx, idx)], cols.T, eps)

