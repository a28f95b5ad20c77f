"""Channel layouts: the structure of a tensor's channel axis.

A layout says, for every entry of a tensor's last (channel) axis, which
channel of which group it holds:

- `("leaf", gid)`: the channels of group `gid`, in order;
- `("cat", (layout, ...))`: a channel-axis concatenation;
- `("tile", layout, t)`: `t` copies (Flatten: positions outer, channels inner);
- `("rep", layout, m)`: every channel repeated `m` times (depth multiplier);
- `("grid", outer, inner)`: every channel of `outer` with every channel of
  `inner`, outer-major (grouped-query attention: query head `k * g + j`
  belongs to key/value head `k` of `outer` and position `j` of `inner`; an
  axis that a reshape made of several: `grid(heads, head_size)`).

A tensor has one layout per axis (`Axes`; `None` where an axis holds no
channels): channels may leave the last axis (an attention's heads).

`Reindex` maps the entries of a layout between a model and its slim model.
"""

from __future__ import annotations

import numpy as np


class Axes(tuple):
    """The layout of every axis of one tensor (`None`: no channels there).

    A handler that declares `axes` may return one for an output instead of
    the layout of its last axis.
    """


def map_leaves(layout, fn):
    kind = layout[0]
    if kind == "leaf":
        return fn(layout[1])
    if kind == "cat":
        return ("cat", tuple(map_leaves(p, fn) for p in layout[1]))
    if kind == "grid":
        return (kind, map_leaves(layout[1], fn), map_leaves(layout[2], fn))
    return (kind, map_leaves(layout[1], fn), layout[2])


def leaves(layout) -> list[int]:
    """The gids a layout reads."""
    if layout[0] == "leaf":
        return [layout[1]]
    if layout[0] == "cat":
        return [g for p in layout[1] for g in leaves(p)]
    if layout[0] == "grid":
        return leaves(layout[1]) + leaves(layout[2])
    return leaves(layout[1])


def layout_size(layout, sizes) -> int:
    """Number of entries of a layout, with `sizes[gid]` channels per leaf."""
    kind = layout[0]
    if kind == "leaf":
        return sizes[layout[1]]
    if kind == "cat":
        return sum(layout_size(p, sizes) for p in layout[1])
    if kind == "grid":
        return layout_size(layout[1], sizes) * layout_size(layout[2], sizes)
    return layout_size(layout[1], sizes) * layout[2]


def flat_channels(layout, sizes) -> tuple[np.ndarray, np.ndarray]:
    """(gid, channel) of every entry of a layout, in order.

    Raises:
        ValueError: the layout is a grid (each entry holds a channel of two
            groups; see `group_channels`).
    """
    kind = layout[0]
    if kind == "grid":
        raise ValueError(
            "A grid layout (grouped-query attention heads) has two groups "
            "per entry; read it with `group_channels`."
        )
    if kind == "leaf":
        n = sizes[layout[1]]
        return np.full(n, layout[1]), np.arange(n)
    if kind == "cat":
        parts = [flat_channels(p, sizes) for p in layout[1]]
        empty = [np.zeros(0, np.int64)]  # an empty part (a split of 0)
        return (
            np.concatenate([p[0] for p in parts] + empty),
            np.concatenate([p[1] for p in parts] + empty),
        )
    g, c = flat_channels(layout[1], sizes)
    if kind == "tile":
        return np.tile(g, layout[2]), np.tile(c, layout[2])
    return np.repeat(g, layout[2]), np.repeat(c, layout[2])


def group_channels(layout, gid: int, sizes) -> np.ndarray:
    """The channel of group `gid` at every entry of a layout (-1: none)."""
    kind = layout[0]
    if kind == "leaf":
        n = sizes[layout[1]]
        return np.arange(n) if layout[1] == gid else np.full(n, -1)
    if kind == "cat":
        return np.concatenate([group_channels(p, gid, sizes)
                               for p in layout[1]]
                              + [np.zeros(0, np.int64)])
    inner = group_channels(layout[1], gid, sizes)
    if kind == "tile":
        return np.tile(inner, layout[2])
    if kind == "rep":
        return np.repeat(inner, layout[2])
    last = group_channels(layout[2], gid, sizes)
    # One side reads other groups only (-1), so the maximum picks `gid`'s.
    return np.maximum(np.repeat(inner, len(last)), np.tile(last, len(inner)))


def _has_grid(layout) -> bool:
    kind = layout[0]
    if kind in ("leaf", "grid"):
        return kind == "grid"
    parts = layout[1] if kind == "cat" else (layout[1],)
    return any(_has_grid(p) for p in parts)


def group_maps(layout, sizes) -> list[tuple[np.ndarray, np.ndarray]]:
    """`[(gid, channel) of every entry]`: one map for a layout, or, for one
    with a grid (entries of two groups), one map per group it reads (the
    entries of other groups at gid -1)."""
    if not _has_grid(layout):
        return [flat_channels(layout, sizes)]
    out = []
    for g in dict.fromkeys(leaves(layout)):
        chans = group_channels(layout, g, sizes)
        out.append((np.where(chans >= 0, g, -1), chans))
    return out


class Reindex:
    """Old <-> new entry indices of channel layouts under a plan."""

    def __init__(self, an, plan):
        self.old = dict(an.sizes)
        self.new = dict(an.sizes)
        self.ids, self.first = {}, {}
        for name, clusters in plan.clusters.items():
            root = an.gid_of[name]
            self.new[root] = len(clusters)
            self.ids[root] = plan.cluster_ids(name, an.sizes[root])
            self.first[root] = np.array([c[0] for c in clusters])

    def select(self, lay) -> np.ndarray:
        """For every new entry, the old entry it copies."""
        kind = lay[0]
        if kind == "leaf":
            r = lay[1]
            return self.first.get(r, np.arange(self.old[r]))
        if kind == "cat":
            out, off = [], 0
            for part in lay[1]:
                out.append(self.select(part) + off)
                off += layout_size(part, self.old)
            return np.concatenate([*out, np.zeros(0, np.int64)])
        if kind == "grid":
            n = layout_size(lay[2], self.old)
            return (self.select(lay[1])[:, None] * n
                    + self.select(lay[2])[None, :]).ravel()
        inner, t = self.select(lay[1]), lay[2]
        n = layout_size(lay[1], self.old)
        if kind == "tile":
            return np.concatenate([inner + p * n for p in range(t)])
        return (inner[:, None] * t + np.arange(t)).ravel()

    def assign(self, lay) -> np.ndarray:
        """For every old entry, the new entry it adds into (-1: removed)."""
        kind = lay[0]
        if kind == "leaf":
            r = lay[1]
            return self.ids.get(r, np.arange(self.old[r]))
        if kind == "cat":
            out, off = [], 0
            for part in lay[1]:
                a = self.assign(part)
                out.append(np.where(a >= 0, a + off, -1))
                off += layout_size(part, self.new)
            return np.concatenate([*out, np.zeros(0, np.int64)])
        if kind == "grid":
            outer, last = self.assign(lay[1]), self.assign(lay[2])
            n = layout_size(lay[2], self.new)
            both = (outer[:, None] >= 0) & (last[None, :] >= 0)
            return np.where(both, outer[:, None] * n + last[None, :],
                            -1).ravel()
        inner, t = self.assign(lay[1]), lay[2]
        n = layout_size(lay[1], self.new)
        if kind == "tile":
            return np.concatenate(
                [np.where(inner >= 0, inner + p * n, -1) for p in range(t)]
            )
        rep = np.repeat(inner, t)
        sub = np.tile(np.arange(t), len(inner))
        return np.where(rep >= 0, rep * t + sub, -1)
