"""`PruningPlan`: which channels of each group survive, and which merge.

A plan maps each planned group to a list of clusters of channel indices. Each
cluster becomes ONE channel of the slim model; a channel in no cluster is
removed. Plain pruning is the special case of singleton clusters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

import numpy as np

from keras_csgd.groups import ChannelGroup

FORMAT_VERSION = 1


class PruningPlan:
    """Clusters of channel indices per channel group.

    Args:
        clusters: `{group_name: [[channel, ...], ...]}`. Each cluster becomes
            one channel of the slim model; channels in no cluster are removed.
        groups: the model's channel groups (`kc.channel_groups(model)`). When
            given, the plan is *bound*: it is validated against them and keeps
            the planned groups' members, axes and sizes, so that optimizers and
            callbacks can apply it to variables without the model. Defaults to
            `None` (unbound).
        remove_blocks: names of the residual blocks' two-input `Add` layers
            whose branch `kc.slim` removes (see `kc.slim`). Defaults to
            `()`.

    Raises:
        ValueError: for an empty cluster, a group with zero clusters, a
            duplicate or negative index; when bound, also for an unknown or
            frozen group, an index out of range.

    Example:

    ```python
    groups = kc.channel_groups(model)
    plan = kc.PruningPlan({"conv1": [[0, 3], [1], [2, 4, 5]]}, groups=groups)
    plan.widths()  # {"conv1": 3}
    ```
    """

    def __init__(
        self,
        clusters: Mapping[str, Iterable[Iterable[int]]],
        groups: Iterable[ChannelGroup]
        | Mapping[str, ChannelGroup]
        | None = None,
        remove_blocks: Iterable[str] = (),
    ):
        if not isinstance(clusters, Mapping):
            raise TypeError(
                "`clusters` must be a dict {group_name: [[channel, ...], ...]}."
                f" Received: clusters={clusters!r}"
            )
        self.clusters = {
            str(name): [[int(i) for i in c] for c in cl]
            for name, cl in clusters.items()
        }
        for name, cl in self.clusters.items():
            _check_clusters(name, cl)
        if isinstance(remove_blocks, str) or not all(
            isinstance(b, str) for b in remove_blocks
        ):
            raise TypeError(
                "`remove_blocks` must be a list of Add layer names. "
                f"Received: remove_blocks={remove_blocks!r}"
            )
        self.remove_blocks = tuple(dict.fromkeys(remove_blocks))
        self.groups: dict[str, ChannelGroup] | None = None
        self.analysis = None  # (model, graph.Analysis) it was made from
        if groups is not None:
            self.bind(groups)

    # ----------------------------------------------------------- binding
    @property
    def bound(self) -> bool:
        """Whether the plan carries its groups (see `bind`)."""
        return self.groups is not None

    def bind(self, groups) -> PruningPlan:
        """Validates the plan against `groups` and keeps the planned ones.

        Args:
            groups: `kc.channel_groups(model)` (a list or a name dict).

        Returns:
            `self`.

        Raises:
            ValueError: unknown group, frozen group, size mismatch, index out
                of range.
        """
        if isinstance(groups, Mapping):
            by_name = dict(groups)
        else:
            by_name = {g.name: g for g in groups}
        unknown = sorted(set(self.clusters) - set(by_name))
        if unknown:
            raise ValueError(
                f"The plan names groups the model does not have: {unknown}. "
                "Was it made for another model? Known groups: "
                f"{sorted(by_name)[:20]}"
            )
        for name, cl in self.clusters.items():
            g = by_name[name]
            if not g.prunable:
                raise ValueError(
                    f"Group {name!r} is frozen and cannot be pruned: "
                    f"{g.reason}"
                )
            top = max(max(c) for c in cl)
            if top >= g.size:
                raise ValueError(
                    f"Group {name!r} has {g.size} channels but the plan uses "
                    f"index {top}. Was the plan made for another model?"
                )
        if self.groups is not None:
            for name in self.clusters:
                if self.groups[name].size != by_name[name].size:
                    raise ValueError(
                        f"Group {name!r} has {by_name[name].size} channels in "
                        f"this model but {self.groups[name].size} in the "
                        "model the plan was made for."
                    )
        self.groups = {name: by_name[name] for name in self.clusters}
        return self

    def require_bound(self, who: str) -> dict[str, ChannelGroup]:
        """Returns the bound groups, or raises a `ValueError` for `who`."""
        if self.groups is None:
            raise ValueError(
                f"{who} needs a bound plan (one that knows its groups' "
                "variables). Make it with `kc.make_plan(model, ...)`, pass "
                "`groups=kc.channel_groups(model)` to `PruningPlan`, or call "
                "`plan.bind(kc.channel_groups(model))`."
            )
        return self.groups

    # ----------------------------------------------------------- queries
    def widths(self) -> dict[str, int]:
        """New width (number of clusters) of every planned group."""
        return {name: len(cl) for name, cl in self.clusters.items()}

    def cluster_ids(self, name: str, size: int | None = None) -> np.ndarray:
        """Cluster index of every channel of group `name` (-1: removed)."""
        if size is None:
            size = self.require_bound("`cluster_ids`")[name].size
        ids = np.full(size, -1, dtype=np.int64)
        for k, c in enumerate(self.clusters[name]):
            ids[c] = k
        return ids

    def variable_segments(self) -> dict[str, tuple[int, np.ndarray, int]]:
        """Cluster segments of every member variable of the planned groups.

        Returns:
            `{variable_path: (axis, segment_ids, num_segments)}`: along
            `axis`, entries with equal segment ids belong to one cluster (the
            same cluster and, behind a depthwise multiplier, the same
            repeat). Entries of unplanned or removed channels are singletons.
        """
        groups = self.require_bound("`variable_segments`")
        per_var: dict[str, tuple[int, list]] = {}
        for name in self.clusters:
            g = groups[name]
            ids = self.cluster_ids(name, g.size)
            for _, path, axis in g.members:
                cmap = g.channel_map(path)
                entry = per_var.setdefault(path, (axis, []))
                entry[1].append((name, ids, cmap))
        out = {}
        for path, (axis, parts) in per_var.items():
            n = len(parts[0][2])
            keys = [("free", i) for i in range(n)]
            for name, ids, cmap in parts:
                seen: dict[int, int] = {}
                for i, ch in enumerate(cmap):
                    if ch < 0 or ids[ch] < 0:
                        continue
                    rep = seen.get(ch, 0)
                    seen[ch] = rep + 1
                    keys[i] = (name, int(ids[ch]), rep)
            uniq: dict = {}
            seg = np.array([uniq.setdefault(k, len(uniq)) for k in keys])
            out[path] = (axis, seg, len(uniq))
        return out

    # ----------------------------------------------------------- JSON
    def to_json(self, indent: int | None = None) -> str:
        """Serializes the plan (and its bound groups) to a JSON string."""
        d = {"format_version": FORMAT_VERSION, "clusters": self.clusters}
        if self.remove_blocks:
            d["remove_blocks"] = list(self.remove_blocks)
        if self.groups is not None:
            d["groups"] = {n: g.to_dict() for n, g in self.groups.items()}
        return json.dumps(d, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        """Inverse of `to_json`.

        Raises:
            ValueError: not a plan, or a format version this package cannot
                read.
        """
        try:
            d = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"`text` is not a JSON pruning plan: {e}") from e
        if not isinstance(d, dict) or not isinstance(d.get("clusters"), dict):
            raise ValueError(
                "`text` is not a JSON pruning plan (`clusters` must be an "
                "object of group names)."
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"Unsupported plan format_version {version!r}; this version "
                f"of keras_csgd reads {FORMAT_VERSION}."
            )
        groups = d.get("groups")
        plan = cls(d["clusters"], remove_blocks=d.get("remove_blocks", ()))
        if groups is not None:
            plan.groups = {
                n: ChannelGroup.from_dict(g) for n, g in groups.items()
            }
        return plan

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, PruningPlan) and self.clusters == other.clusters
            and self.remove_blocks == other.remove_blocks
        )

    def __repr__(self) -> str:
        w = self.widths()
        shown = ", ".join(f"{k}: {v}" for k, v in list(w.items())[:6])
        more = ", ..." if len(w) > 6 else ""
        blocks = (
            f", remove_blocks={list(self.remove_blocks)}"
            if self.remove_blocks else ""
        )
        return f"PruningPlan({{{shown}{more}}}{blocks}, bound={self.bound})"

    def made_for(self, model):
        """The analysis the plan was made from, if made from `model`."""
        if self.analysis is not None and self.analysis[0] is model:
            return self.analysis[1]
        return None


def coerce_plan(plan, who: str) -> PruningPlan:
    """`plan` (a `PruningPlan` or its JSON) as a bound `PruningPlan`.

    Raises:
        TypeError: neither a plan nor a string.
        ValueError: bad JSON, or an unbound plan (the message names `who`).
    """
    if isinstance(plan, str):
        plan = PruningPlan.from_json(plan)
    if not isinstance(plan, PruningPlan):
        raise TypeError(
            "`plan` must be a `kc.PruningPlan` or its JSON. "
            f"Received: plan={plan!r}"
        )
    plan.require_bound(who)
    return plan


def _check_clusters(name: str, clusters: list[list[int]]) -> None:
    if not clusters:
        raise ValueError(
            f"Group {name!r} has zero clusters; a group needs at least one "
            "(remove the group from the plan to leave it unchanged)."
        )
    seen: set[int] = set()
    for c in clusters:
        if not c:
            raise ValueError(f"Group {name!r} has an empty cluster.")
        for i in c:
            if i < 0:
                raise ValueError(
                    f"Group {name!r}: channel indices must be >= 0. "
                    f"Received: {i}"
                )
            if i in seen:
                raise ValueError(
                    f"Group {name!r}: channel {i} is in more than one "
                    "cluster (duplicate index)."
                )
            seen.add(i)


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
            The width is `ceil(keep * size)`. Defaults to `0.625`.
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
            an unknown or frozen group.

    Example:

    ```python
    plan = kc.make_plan(model, keep=0.625, method="kmeans", round_to=8)
    ```
    """
    from keras_csgd import graph

    if method not in ("even", "kmeans"):
        raise ValueError(
            '`method` must be "even" or "kmeans". '
            f"Received: method={method!r}"
        )
    check_round_to(round_to)
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
        fractions = dict(keep)
    else:
        fractions = {g.name: keep for g in groups if g.prunable}
    clusters = {}
    for name, frac in fractions.items():
        check_keep(frac)
        g = by_name[name]
        width = target_width(g.size, frac, round_to)
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


def check_round_to(round_to) -> None:
    """Raises `ValueError` unless `round_to` is a positive int or `None`."""
    if round_to is not None and (
        isinstance(round_to, bool) or not isinstance(round_to, int)
        or round_to < 1
    ):
        raise ValueError(
            "`round_to` must be a positive int or None. "
            f"Received: round_to={round_to!r}"
        )


def check_keep(keep) -> None:
    """Raises `ValueError` unless `keep` is a number in (0, 1]."""
    if (
        isinstance(keep, bool)
        or not isinstance(keep, (int, float, np.floating))
        or not 0 < keep <= 1
    ):
        raise ValueError(
            f"`keep` must be a fraction in (0, 1]. Received: keep={keep!r}"
        )
