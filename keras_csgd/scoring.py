"""Plan makers: keep the best-scored channels, or cut clusterings to width.

The one place where a method's result meets `keep`, `round_to` and a MACs
budget: `plan_from_scores` (channel scores: magnitude, ensembles, ...) and
`plan_from_clusters` (channel clusterings: similarity, functionality).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import numpy as np

from keras_csgd import checks, graph
from keras_csgd.clusters import mergeable, uniform_widths
from keras_csgd.flops import macs_at
from keras_csgd.groups import ChannelGroup
from keras_csgd.plan import PruningPlan


def plan_from_scores(
    model,
    scores: Mapping[str, np.ndarray],
    keep: float | None = None,
    *,
    macs_budget: float | None = None,
    round_to: int | None = None,
) -> PruningPlan:
    """Keeps the channels with the highest scores (larger = more important).

    Per group (`keep`, the default): each scored group keeps its
    `target_width(size, keep, round_to)` best channels (grouped-query heads
    and the hidden width of decoder LLMs as
    `keras_csgd.clusters.uniform_widths`
    says: about `keep` of the query heads, and the backbone's class kept).

    Global (`macs_budget` given): scores are made comparable across groups
    by dividing each group's scores by the group's largest absolute score
    (so scale differences between layers, as with filter norms, do not
    decide); then channels are removed from the lowest normalized score
    upwards, never the last channel of a group, until the slim model's MACs
    are at most `macs_budget * kc.count_macs(model)`. The MACs come from the
    analytic cost model (`kc.macs_under`, no slim model is built); the
    number of removed channels is found by bisection.

    Args:
        model: the functional or Sequential `keras.Model` that was scored.
        scores: `{group_name: array of one score per channel}`. Groups not
            named are left unplanned.
        keep: kept fraction of each group, in (0, 1]. Defaults to `None`
            (`0.5`, or the global mode when `macs_budget` is given).
        macs_budget: kept fraction of the model's MACs, in (0, 1]: ranks
            channels across groups. Defaults to `None` (per group).
        round_to: per-group mode only: round widths to a multiple of
            `round_to` (see `kc.make_plan`). Defaults to `None`.

    Returns:
        A bound `PruningPlan` of singleton clusters (plain pruning), kept
        channels in increasing order.

    Raises:
        ValueError: unknown or frozen group, scores of the wrong length, bad
            `keep` or `macs_budget`, `keep` or `round_to` together with
            `macs_budget`.

    Example:

    ```python
    scores = kc.methods.ensemble_importance(model, (x_val, y_val))
    plan = kc.plan_from_scores(model, scores, macs_budget=0.5)
    slim = kc.slim(model, plan)
    ```
    """
    an = graph.analyze(model)
    by_name = {g.name: g for g in an.groups}
    if macs_budget is None:
        keep = 0.5 if keep is None else keep
        checks.fraction("keep", keep)
        checks.positive_int("round_to", round_to, allow_none=True)
        scores = checked_scores(scores, by_name)
        widths = uniform_widths(model, an, scores, keep, round_to)
        clusters = {name: top_channels(s, widths[name])
                    for name, s in scores.items()}
        return _bound(PruningPlan(clusters, groups=an.groups), model, an)
    for name, value in (("keep", keep), ("round_to", round_to)):
        if value is not None:
            raise ValueError(
                f"`{name}` is per group; it cannot be combined with "
                f"`macs_budget`. Received: {name}={value!r}"
            )
    checks.fraction("macs_budget", macs_budget)
    scores = checked_scores(scores, by_name)
    return _bound(_global_plan(an, scores, macs_budget), model, an)


def plan_from_clusters(
    model,
    cluster: Callable[[list[tuple[ChannelGroup, int]]],
                      Mapping[str, list[list[int]]]],
    keep: float = 0.5,
    *,
    round_to: int | None = None,
    analysis: graph.Analysis | None = None,
) -> PruningPlan:
    """A plan from a method that clusters channels to a given width.

    Every prunable group whose width `target_width(size, keep, round_to)`
    (`uniform_widths` for coupled groups) is smaller than its size is
    handed to `cluster`, all at once (a method
    that reads data does one pass for all of them). Prune-only groups
    (`ChannelGroup.exact` is False) are not: their channels cannot merge;
    nor is a stream whose merges would cost a decoder LLM its class
    (`keras_csgd.clusters.mergeable`).

    Args:
        model: a functional or Sequential `keras.Model`.
        cluster: `cluster([(group, width), ...]) -> {group_name: clusters}`
            with exactly `width` clusters of channel indices per group.
        keep: kept fraction of every prunable group, in (0, 1]. Defaults to
            `0.5`.
        round_to: round widths to a multiple of `round_to` (see
            `kc.make_plan`). Defaults to `None`.
        analysis: `graph.analyze(model)` when at hand. Defaults to `None`.

    Returns:
        A bound `PruningPlan` naming every group that shrinks.

    Raises:
        ValueError: bad `keep` or `round_to`; `cluster` returned another
            number of clusters than asked for.

    Example:

    ```python
    def cluster(todo):
        return {g.name: even_clusters(g.size, w) for g, w in todo}

    plan = kc.scoring.plan_from_clusters(model, cluster, keep=0.5)
    ```
    """
    checks.fraction("keep", keep)
    checks.positive_int("round_to", round_to, allow_none=True)
    an = analysis or graph.analyze(model)
    by_name = {g.name: g for g in an.groups}
    widths = uniform_widths(model, an, mergeable(model, an), keep, round_to)
    todo = [(by_name[name], width) for name, width in widths.items()
            if width < by_name[name].size]
    clusters = dict(cluster(todo)) if todo else {}
    for g, width in todo:
        if len(clusters.get(g.name, ())) != width:
            raise ValueError(
                f"`cluster` must return {width} clusters for group "
                f"{g.name!r}. Received: {len(clusters.get(g.name, ()))}"
            )
    return _bound(PruningPlan(clusters, groups=an.groups), model, an)


def _bound(plan: PruningPlan, model, an: graph.Analysis) -> PruningPlan:
    """`plan` with the analysis it was made from (so `slim` reuses it)."""
    plan.analysis = (model, an)
    return plan


def checked_scores(scores, by_name) -> dict[str, np.ndarray]:
    """`scores` as float64 vectors, checked against the model's groups.

    Args:
        scores: `{group_name: one score per channel}`.
        by_name: `{group_name: ChannelGroup}` of the model's analysis.

    Raises:
        TypeError: if `scores` is not a mapping.
        ValueError: a group that is unknown or frozen, a wrong number of
            scores, or a NaN or Inf score.
    """
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


def top_channels(s: np.ndarray, width: int) -> list[list[int]]:
    """Singleton clusters of the `width` best-scored channels, in order
    (ties go to the lower index)."""
    kept = np.sort(np.argsort(-s, kind="stable")[:width])
    return [[int(i)] for i in kept]


def _global_plan(an, scores, budget) -> PruningPlan:
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

    def macs_after(k):
        widths = {an.gid_of[name]: len(s) for name, s in scores.items()}
        for name, _ in order[:k]:
            widths[an.gid_of[name]] -= 1
        return macs_at(an, widths)

    target = budget * macs_at(an, {})
    lo, hi = 0, len(order)
    if macs_after(hi) > target:
        warnings.warn(
            f"`plan_from_scores`: the MACs budget {budget} cannot be met "
            "with one channel left per group; returning the smallest plan.",
            stacklevel=3,
        )
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        if macs_after(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    removed: dict[str, set[int]] = {name: set() for name in scores}
    for name, i in order[:lo]:
        removed[name].add(i)
    clusters = {
        name: [[i] for i in range(len(s)) if i not in removed[name]]
        for name, s in scores.items()
    }
    return PruningPlan(clusters, groups=an.groups)
