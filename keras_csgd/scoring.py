"""`plan_from_scores`: a pruning plan that keeps the best-scored channels."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

from keras_csgd import graph
from keras_csgd.flops import count_macs
from keras_csgd.plan import PruningPlan, check_keep, target_width
from keras_csgd.surgery import slim


def plan_from_scores(
    model,
    scores: Mapping[str, np.ndarray],
    keep: float = 0.5,
    global_: bool = False,
    macs_budget: float | None = None,
    round_to: int | None = None,
) -> PruningPlan:
    """Keeps the channels with the highest scores (larger = more important).

    Per group (default): each scored group keeps its
    `target_width(size, keep, round_to)` best channels.

    Global (`global_=True`): scores are made comparable across groups by
    dividing each group's scores by the group's largest absolute score (so
    scale differences between layers, as with filter norms, do not decide);
    then channels are removed from the lowest normalized score upwards, never
    the last channel of a group, until the slim model's MACs
    (`kc.count_macs(kc.slim(model, plan))`) are at most
    `macs_budget * kc.count_macs(model)`. The number of removed channels is
    found by bisection (about `log2(channels)` slims).

    Args:
        model: the functional or Sequential `keras.Model` that was scored.
        scores: `{group_name: array of one score per channel}`. Groups not
            named are left unplanned.
        keep: kept fraction of each group, in (0, 1]; in global mode, the
            MACs budget when `macs_budget` is `None`. Defaults to `0.5`.
        global_: rank channels across groups under a MACs budget. Defaults
            to `False`.
        macs_budget: kept fraction of the model's MACs in global mode, in
            (0, 1]. Defaults to `None` (use `keep`).
        round_to: per-group mode only: round widths to a multiple of
            `round_to` (see `kc.make_plan`). Defaults to `None`.

    Returns:
        A bound `PruningPlan` of singleton clusters (plain pruning), kept
        channels in increasing order.

    Raises:
        ValueError: unknown or frozen group, scores of the wrong length, bad
            `keep` or `macs_budget`, `round_to` with `global_=True`.

    Example:

    ```python
    scores = kc.methods.ensemble_importance(model, (x_val, y_val))
    plan = kc.plan_from_scores(model, scores, keep=0.5, global_=True)
    slim = kc.slim(model, plan)
    ```
    """
    check_keep(keep)
    groups = graph.channel_groups(model)
    by_name = {g.name: g for g in groups}
    scores = _checked_scores(scores, by_name)
    if not global_:
        clusters = {
            name: _top(s, target_width(len(s), keep, round_to))
            for name, s in scores.items()
        }
        return PruningPlan(clusters, groups=groups)
    if round_to is not None:
        raise ValueError(
            "`round_to` is only supported with `global_=False`. "
            f"Received: round_to={round_to!r}"
        )
    budget = keep if macs_budget is None else macs_budget
    if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(
            "`macs_budget` must be a fraction in (0, 1]. "
            f"Received: macs_budget={macs_budget!r}"
        )
    return _global_plan(model, scores, groups, budget)


def _checked_scores(scores, by_name) -> dict[str, np.ndarray]:
    if not isinstance(scores, Mapping):
        raise TypeError(
            "`scores` must be a dict {group_name: array}. "
            f"Received: scores={type(scores).__name__}"
        )
    out = {}
    for name, s in scores.items():
        g = by_name.get(name)
        if g is None or not g.prunable:
            why = "unknown group" if g is None else g.reason
            raise ValueError(
                f"`scores` names group {name!r} that cannot be pruned "
                f"({why})."
            )
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if len(s) != g.size:
            raise ValueError(
                f"`scores[{name!r}]` must have one score per channel "
                f"({g.size}). Received: {len(s)} scores"
            )
        if not np.isfinite(s).all():
            raise ValueError(
                f"`scores[{name!r}]` holds NaN or Inf (channels "
                f"{np.flatnonzero(~np.isfinite(s)).tolist()[:8]}); are the "
                "model's weights finite?"
            )
        out[name] = s
    return out


def _top(s: np.ndarray, width: int) -> list[list[int]]:
    kept = np.sort(np.argsort(-s, kind="stable")[:width])
    return [[int(i)] for i in kept]


def _global_plan(model, scores, groups, budget) -> PruningPlan:
    normalized = {}
    for name, s in scores.items():
        top = np.max(np.abs(s))
        normalized[name] = s / top if top > 0 else s
    candidates = sorted(
        (v, name, i)
        for name, s in normalized.items()
        for i, v in enumerate(s)
    )
    left = {name: len(s) for name, s in scores.items()}
    order = []
    for _, name, i in candidates:
        if left[name] > 1:
            left[name] -= 1
            order.append((name, i))

    def plan_for(k):
        removed: dict[str, set[int]] = {name: set() for name in scores}
        for name, i in order[:k]:
            removed[name].add(i)
        clusters = {
            name: [[i] for i in range(len(s)) if i not in removed[name]]
            for name, s in scores.items()
        }
        return PruningPlan(clusters, groups=groups)

    target = budget * count_macs(model)
    lo, hi = 0, len(order)
    if count_macs(slim(model, plan_for(hi))) > target:
        warnings.warn(
            f"`plan_from_scores`: the MACs budget {budget} cannot be met "
            "with one channel left per group; returning the smallest plan.",
            stacklevel=2,
        )
        return plan_for(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if count_macs(slim(model, plan_for(mid))) <= target:
            hi = mid
        else:
            lo = mid + 1
    return plan_for(lo)
