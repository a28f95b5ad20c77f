"""`PruningPlan`: which channels of each group survive, and which merge.

A plan maps each planned group to a list of clusters of channel indices. Each
cluster becomes ONE channel of the slim model; a channel in no cluster is
removed. Plain pruning is the special case of singleton clusters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import numpy as np

from keras_csgd import blocks
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
        gates: `{block: [variable path, ...]}`, the variables whose zeros
            silence each removed block's branch (`bind_blocks` finds them;
            `kc.CSGD` drives them to zero). Defaults to `None` (unknown).

    Raises:
        ValueError: for an empty cluster, a group with zero clusters, a
            duplicate or negative index; when bound, also for an unknown or
            frozen group, an index out of range, a merge (a cluster of more
            than one channel) in a prune-only group (`ChannelGroup.exact`).

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
        gates: Mapping[str, Iterable[str]] | None = None,
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
        self.gates = None if gates is None else {
            str(b): [str(p) for p in paths] for b, paths in gates.items()
        }
        if self.gates is not None and set(self.gates) != set(
                self.remove_blocks):
            raise ValueError(
                "`gates` must name exactly the `remove_blocks`. Received: "
                f"gates={sorted(self.gates)}, "
                f"remove_blocks={list(self.remove_blocks)}"
            )
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
                of range, a merge in a prune-only group.
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
            if not g.exact and any(len(c) > 1 for c in cl):
                raise ValueError(
                    f"Group {name!r} may only be pruned, not merged: "
                    f"{g.prune_only}. Give it singleton clusters (plain "
                    "pruning, then fine-tune), or leave it out of the plan."
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

    def bind_blocks(self, model) -> PruningPlan:
        """Finds the gate variables of the removed blocks in `model`.

        The gate of a block is what `kc.CSGD` drives to zero so that
        `kc.slim` removes a dead branch (see `keras_csgd.blocks`); the
        plan makers that remove blocks call this.

        Args:
            model: the model the plan is for.

        Returns:
            `self`.

        Raises:
            ValueError: a name that is not a residual block of `model`, or
                a block whose branch cannot be driven to zero.
        """
        self.gates = blocks.branch_gates(model, self.remove_blocks)
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
            repeat; on a grid of two planned groups, the same pair of
            clusters). Entries of unplanned or removed channels are
            singletons.
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
            claims: list[list] = [[] for _ in range(n)]
            removed = np.zeros(n, bool)
            for name, ids, cmap in parts:
                seen: dict[int, int] = {}
                for i, ch in enumerate(cmap):
                    if ch < 0:
                        continue
                    rep = seen.get(ch, 0)
                    seen[ch] = rep + 1
                    removed[i] |= ids[ch] < 0
                    claims[i].append((name, int(ids[ch]), rep))
            # An entry of two planned groups (a grid of grouped-query
            # heads) belongs to the pair of their clusters.
            keys = [("free", i) if removed[i] or not c else c[0]
                    if len(c) == 1 else tuple(k[:2] for k in c)
                    for i, c in enumerate(claims)]
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
        if self.gates:
            d["gates"] = self.gates
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
        plan = cls(d["clusters"], remove_blocks=d.get("remove_blocks", ()),
                   gates=d.get("gates"))
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
