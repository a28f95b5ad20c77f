"""`structural_search`: per-group sparsities under an accuracy floor."""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_csgd import checks, graph
from keras_csgd.methods.compensation.refit import compensate
from keras_csgd.methods.compensation.solve import cap_rank
from keras_csgd.methods.compensation.statistics import (
    collect_statistics,
    supported,
)
from keras_csgd.plan import PruningPlan


def _searchable(model, analysis) -> list:
    """Prunable groups whose consumers all have collectable statistics."""
    out = []
    for g in analysis.groups:
        names = {lname for lname, _, _ in g.consumers}
        # A prune-only group's kept channels change with the removed
        # ones (its normalization): no refit can compensate that.
        if (not g.prunable or not g.exact or not names
                or any("/" in n for n in names)):
            continue
        if all(supported(model.get_layer(n)) for n in names):
            out.append(g)
    return out


def _group_ranking(model, analysis, group, stats) -> np.ndarray:
    """`cap_rank` of a group over all its consumers (other groups fixed)."""
    root = analysis.gid_of[group.name]
    names, kernels, channels = [], [], []
    for e, gids, chans in analysis.consumer_maps():
        if e.lname not in stats or not (gids == root).any():
            continue
        names.append(e.lname)
        kernels.append(model.get_layer(e.lname).kernel.numpy())
        channels.append(np.where(gids == root, chans, -1))
    return cap_rank([stats[n] for n in names], kernels, channels)


def structural_search(
    model,
    data,
    evaluate,
    acc_start,
    acc_end,
    *,
    steps=6,
    min_keep=0.1,
    verbose=1,
    seed=0,
    max_batches=None,
    batch_size=64,
):
    """Binary structural search of per-group sparsities under compensation.

    The prunable channel groups whose consumers are all top-level
    Conv1D/Conv2D/Dense layers are visited in topological order. For group
    `i` of `n` the accuracy floor is
    `acc_start + (acc_end - acc_start) * (i + 1) / n` (falling linearly to
    `acc_end` at the last group). For each group: collect the statistics of
    its consumers on the current model (which already carries the earlier
    groups' pruning and compensation), rank its channels with `cap_rank`,
    and binary-search over `steps` iterations the largest sparsity in
    `[0, 1 - min_keep]` (removed channels `floor(sparsity * size)`, at least
    one channel kept) whose compensated model scores `evaluate(model) >=
    floor`; the best candidate becomes the current model.

    Args:
        model: the trained functional or Sequential `keras.Model`.
        data: statistics data, in any form `keras_csgd.batches` reads (a
            NumPy array of inputs, a `tf.data.Dataset` of `x` or
            `(x, y, ...)` batches, ...).
        evaluate: callable `evaluate(model) -> float`, the score the floor
            applies to (e.g. validation accuracy); larger is better.
        acc_start: floor after the first group.
        acc_end: floor after the last group.
        steps: binary-search iterations per group. Defaults to `6`.
        min_keep: smallest kept fraction of a group, in (0, 1] (the
            largest sparsity searched is `1 - min_keep`; called
            `max_sparsity=0.9` before). Defaults to `0.1`.
        verbose: `0` silent, `1` progress bar over groups. Defaults to `1`.
        seed: seeds Python, NumPy and the backend
            (`keras.utils.set_random_seed`) before the search, so that a
            stochastic `evaluate` or data pipeline repeats. The search
            itself is deterministic. Defaults to `0`.
        max_batches: batches of `data` per statistics pass. Defaults to
            `None` (all).
        batch_size: batch size for a NumPy `data`. Defaults to `64`.

    Returns:
        `(plan, slim_model)`: a `PruningPlan` bound to `model`'s groups
        (singleton clusters, kept channels in increasing order) and the
        compensated slim model.

    Raises:
        ValueError: for `steps < 1` or `min_keep` outside `(0, 1]`.

    Example:

    ```python
    def evaluate(m):
        m.compile(metrics=["accuracy"], loss="sparse_categorical_crossentropy")
        return m.evaluate(x_val, y_val, verbose=0)[1]

    plan, small = compensation.structural_search(
        model, x_calib, evaluate, acc_start=0.92, acc_end=0.90
    )
    ```

    References:
        Xie et al., arXiv 2108.13728, section 3.3 (binary structural search
        with a step constraint).
    """
    checks.positive_int("steps", steps)
    checks.fraction("min_keep", min_keep)
    keras.utils.set_random_seed(seed)
    groups = _searchable(model, graph.analyze(model))
    bar = keras.utils.Progbar(
        len(groups),
        verbose=verbose,
        stateful_metrics=["floor", "sparsity"],
        unit_name="group",
    )
    current, kept = model, {}
    for i, group in enumerate(groups):
        floor = acc_start + (acc_end - acc_start) * (i + 1) / len(groups)
        analysis = graph.analyze(current)
        names = sorted({lname for lname, _, _ in group.consumers})
        stats = collect_statistics(
            current, data, names, max_batches, verbose=0,
            batch_size=batch_size,
        )
        order = _group_ranking(current, analysis, group, stats)
        size = group.size
        lo, hi, best, tried = 0.0, 1 - min_keep, 0, {}
        for _ in range(steps):
            mid = (lo + hi) / 2
            n_remove = min(size - 1, math.floor(mid * size))
            if n_remove and n_remove not in tried:
                keep = sorted(order[: size - n_remove].tolist())
                plan = PruningPlan({group.name: [[c] for c in keep]})
                candidate = compensate(current, plan, stats)
                tried[n_remove] = (float(evaluate(candidate)), candidate)
            if n_remove == 0 or tried[n_remove][0] >= floor:
                lo, best = mid, max(best, n_remove)
            else:
                hi = mid
        if best:
            current = tried[best][1]
            kept[group.name] = sorted(order[: size - best].tolist())
        bar.update(
            i + 1,
            values=[("floor", floor), ("sparsity", best / size)],
        )
    plan = PruningPlan(
        {name: [[c] for c in keep] for name, keep in kept.items()},
        groups=graph.channel_groups(model),
    )
    return plan, current
