"""Making C-SGD plans: widths per group and clusters of channels.

`make_plan` gives every prunable group `target_width(size, keep, round_to)`
clusters: consecutive runs (`even_clusters`) or k-means on the producer
filters (`kmeans_clusters`). Plans from importance scores are made in
`keras_csgd.scoring`.

One `keep` for every group (`uniform_widths`, which every plan maker with
a float `keep` uses) is not `target_width` of each where groups work
together:

- grouped-query heads are a grid of two groups (`layers.decoders`: the
  key/value heads, and the query positions within a key/value group);
  keeping `keep` of both would keep `keep ** 2` of the query heads. One of
  the two is cut, the other kept whole (so every key/value group keeps the
  same query positions): whichever keeps nearer `keep` of the query heads,
  the key/value heads on a tie (a smaller key/value cache);
- backbones that derive the head size as `hidden_dim // num_query_heads`
  (Llama, Qwen2, Phi3, GPT-2: `llm.head_couplings`) keep their class, and
  `generate`, only when the slim hidden width is the kept heads times the
  head size. So the hidden width follows the heads (`heads * head_dim`);
  where the plan leaves the hidden width whole (the plans that merge leave
  GPT-2's, whose class cannot weigh merged channels: `mergeable`), the
  heads stay whole too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from keras_csgd import checks, graph, llm
from keras_csgd.graph.layout import leaves
from keras_csgd.plan import PruningPlan


def target_width(size: int, keep: float, round_to: int | None = None) -> int:
    """Width kept of a group of `size` channels.

    `ceil(keep * size)`, or with `round_to=k` the nearest multiple of `k`
    (halves round up, as `ceil` does: keep 0.625 of 32 channels with
    `round_to=8` keeps 24; at least `k`, at most `size`).
    """
    if round_to is None:
        return max(1, min(size, math.ceil(keep * size - 1e-9)))
    width = math.floor(keep * size / round_to + 0.5) * round_to
    return max(min(round_to, size), min(size, width))


def mergeable(model, an) -> list[str]:
    """The groups a plan that merges plans with one `keep`: the prunable,
    exact ones (`ChannelGroup.exact`), less a stream whose merges would
    cost a decoder backbone its class (`llm.unweighed_stream`: GPT-2's)."""
    lost = llm.unweighed_stream(model, an)
    return [g.name for g in an.groups
            if g.prunable and g.exact and g.name not in lost]


def uniform_widths(model, an, names, keep: float,
                   round_to: int | None = None) -> dict[str, int]:
    """The widths one `keep` gives the groups `names` (module docstring).

    Args:
        model: the model `an` analyses.
        an: `graph.analyze(model)`.
        names: the groups to plan.
        keep: kept fraction, in (0, 1].
        round_to: round widths to a multiple of `round_to` (see
            `target_width`). Defaults to `None`.

    Returns:
        `{group_name: width}` for every name of `names`.
    """
    size = {g.name: g.size for g in an.groups}
    widths = {n: target_width(size[n], keep, round_to) for n in names}
    name_of = {gid: n for n, gid in an.gid_of.items()}
    for keys in an.widths.values():
        heads = keys.get("num_query_heads")
        if heads is not None and an.root(heads)[0] == "grid":
            pair = [name_of.get(g) for g in leaves(an.root(heads))]
            if all(n in widths for n in pair):
                widths.update(zip(pair, _cut_one(
                    [size[n] for n in pair], keep, round_to)))
    for stream, heads, head_dim in llm.head_couplings(model, an):
        if not all(n in widths for n in heads):
            continue
        if stream in widths:
            widths[stream] = math.prod(widths[n] for n in heads) * head_dim
        else:
            widths.update((n, size[n]) for n in heads)
    return widths


def _cut_one(sizes: list[int], keep: float,
             round_to: int | None) -> tuple[int, int]:
    """The widths of a grid of two groups (`sizes`): one cut to `keep`,
    the other whole, whichever keeps nearer `keep` of the grid (the
    outer one on a tie)."""
    outer, inner = sizes
    cuts = ((target_width(outer, keep, round_to), inner),
            (outer, target_width(inner, keep, round_to)))
    return min(cuts, key=lambda w: abs(w[0] * w[1] - keep * outer * inner))


def even_clusters(size: int, width: int) -> list[list[int]]:
    """`width` runs of consecutive channels, the first `size % width` longer."""
    base, extra = divmod(size, width)
    out, start = [], 0
    for k in range(width):
        n = base + (1 if k < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def kmeans_clusters(
    filters: np.ndarray, width: int, seed: int = 0
) -> list[list[int]]:
    """k-means (seeded) on rows of `filters` (`(channels, features)`).

    Clusters are sorted by their smallest channel index, and k-means' rare
    empty clusters are refilled by splitting the largest, so that exactly
    `width` non-empty clusters come back.
    """
    from sklearn.cluster import KMeans

    size = filters.shape[0]
    if width >= size:
        return [[i] for i in range(size)]
    labels = KMeans(
        n_clusters=width, n_init=3, random_state=seed
    ).fit_predict(filters.astype(np.float64))
    clusters = [
        sorted(np.flatnonzero(labels == k).tolist()) for k in range(width)
    ]
    clusters = [c for c in clusters if c]
    while len(clusters) < width:
        clusters.sort(key=len)
        big = clusters.pop()
        clusters += [big[: len(big) // 2], big[len(big) // 2 :]]
    return sorted(clusters, key=min)


def make_plan(
    model,
    keep: float | Mapping[str, float] = 0.625,
    method: str = "even",
    seed: int = 0,
    round_to: int | None = None,
) -> PruningPlan:
    """Makes a bound C-SGD plan: clusters per prunable group.

    Args:
        model: a functional or Sequential `keras.Model`.
        keep: kept fraction per prunable group, a float in (0, 1] or a dict
            `{group_name: fraction}` (groups not named are left unplanned).
            The width is `ceil(keep * size)`. A float plans the groups
            whose merges are exact (`mergeable`): prune-only groups
            (`ChannelGroup.exact` is False: a residual stream read by a
            tied output embedding with no norm of its own) are left
            unplanned, since C-SGD cannot merge them exactly; prune those
            with `kc.methods.magnitude_plan` or `kc.plan_from_scores` and
            fine-tune. A float keeps about `keep` of grouped-query heads,
            and a decoder LLM's class (`uniform_widths`). Defaults to
            `0.625`.
        method: `"even"` (consecutive runs, the first `size % width` one
            longer) or `"kmeans"` (seeded k-means on the group's producer
            filters, flattened and concatenated across producers). Defaults
            to `"even"`.
        seed: k-means seed. Defaults to `0`.
        round_to: when set, widths are rounded to the nearest multiple of
            `round_to` (at least `round_to`, at most the size): CPU kernels
            run faster on such widths. Defaults to `None`.

    Returns:
        A bound `PruningPlan`.

    Raises:
        ValueError: bad `keep`, `method` or `round_to`; a `keep` dict naming
            an unknown or frozen group, or merging a prune-only group.

    Example:

    ```python
    plan = kc.make_plan(model, keep=0.625, method="kmeans", round_to=8)
    ```
    """
    if method not in ("even", "kmeans"):
        raise ValueError(
            '`method` must be "even" or "kmeans". '
            f"Received: method={method!r}"
        )
    checks.positive_int("round_to", round_to, allow_none=True)
    an = graph.analyze(model)
    groups = an.groups
    by_name = {g.name: g for g in groups}
    if isinstance(keep, Mapping):
        for name in keep:
            if name not in by_name or not by_name[name].prunable:
                why = "unknown" if name not in by_name else by_name[name].reason
                raise ValueError(
                    f"`keep` names group {name!r} that cannot be pruned "
                    f"({why})."
                )
            checks.fraction("keep", keep[name])
        widths = {name: target_width(by_name[name].size, frac, round_to)
                  for name, frac in keep.items()}
    else:
        checks.fraction("keep", keep)
        widths = uniform_widths(model, an, mergeable(model, an), keep,
                                round_to)
    clusters = {}
    for name, width in widths.items():
        g = by_name[name]
        if method == "even":
            clusters[name] = even_clusters(g.size, width)
        else:
            filters = graph.producer_filters(model, g)
            if not np.isfinite(filters).all():
                raise ValueError(
                    f"Group {name!r} has NaN or Inf producer weights; "
                    "k-means needs finite filters."
                )
            clusters[name] = kmeans_clusters(filters, width, seed)
    plan = PruningPlan(clusters, groups=groups)
    plan.analysis = (model, an)
    return plan
