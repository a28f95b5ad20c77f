"""Channel spaces: the groups of an analysis, merged and split.

Every group starts as a run of `size` channels (`new_group`). Merges
(`unify`: an addition, a multiplication) make two runs one channel space
(a union-find over group ids). A split of a run (`split`: `ops.split` on the
channel axis, or an addition of a concatenation to one producer's output)
cuts a group into *parts*, groups of their own: a layout that reads the
group reads its parts laid end to end from then on (`resolve`), so the
layouts recorded before the split stay valid.
"""

from __future__ import annotations

import numpy as np

from keras_csgd.graph.layout import layout_size, leaves, map_leaves


class Spaces:
    """Group ids, their sizes, merges, splits and frozen reasons."""

    def __init__(self):
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.origin: dict[int, str] = {}
        self.frozen: dict[int, list[str]] = {}
        self.inexact: dict[int, list[str]] = {}
        self.parts: dict[int, tuple[int, ...]] = {}

    def new_group(self, size: int, origin: str, frozen: str | None = None):
        """A layout of `size` new channels (a new group)."""
        gid = len(self.parent)
        self.parent[gid] = gid
        self.size[gid] = int(size)
        self.origin[gid] = origin
        self.frozen[gid] = [frozen] if frozen else []
        self.inexact[gid] = []
        return ("leaf", gid)

    def freeze(self, layout, reason: str) -> None:
        """Marks every group `layout` reads as not prunable."""
        self._note(self.frozen, layout, reason)

    def prune_only(self, layout, reason: str) -> None:
        """Marks every group `layout` reads as prune-only: its channels
        may be removed, but merging them is not exact (a normalization
        over them)."""
        self._note(self.inexact, layout, reason)

    def _note(self, notes, layout, reason: str) -> None:
        for g in leaves(self.resolve(layout)):
            if reason not in notes[g]:
                notes[g].append(reason)

    def resolve(self, layout):
        """`layout` in terms of live groups (roots that are not split)."""
        return map_leaves(layout, self._expand)

    def _expand(self, g: int):
        r = self.find(g)
        if r not in self.parts:
            return ("leaf", r)
        return ("cat", tuple(self._expand(p) for p in self.parts[r]))

    def live(self) -> list[int]:
        """The groups of the analysis: roots that are not split."""
        return sorted({self.find(g) for g in self.parent} - set(self.parts))

    def split(self, layout, sizes) -> list | None:
        """`layout` cut into runs of `sizes` channels, or `None`.

        Groups a cut falls inside are split into parts. `None` when the
        layout repeats or tiles channels.
        """
        bounds = set(np.cumsum(sizes)[:-1].tolist())
        while True:
            chain = self._chain(layout)
            if chain is None:
                return None
            if not self._cut(chain, bounds):
                break
        out, i = [], 0
        for s in sizes:
            piece, n = [], 0
            while n < s:
                piece.append(("leaf", chain[i]))
                n += self.size[chain[i]]
                i += 1
            out.append(piece[0] if len(piece) == 1 else self.cat(piece))
        return out

    def unify(self, a, b) -> bool:
        """Makes two layouts the same channel space; False if impossible.

        Runs of groups are aligned first: a group whose run the other
        layout cuts is split there.
        """
        ca, cb = self._chain(a), self._chain(b)
        if ca is not None and cb is not None:
            if self._run(ca) != self._run(cb):
                return False
            while True:
                ca, cb = self._chain(a), self._chain(b)
                bounds = self._bounds(ca) | self._bounds(cb)
                if not (self._cut(ca, bounds) | self._cut(cb, bounds)):
                    break
            for x, y in zip(ca, cb):
                self._union(x, y)
            return True
        a, b = self.resolve(a), self.resolve(b)
        same_shape = a[0] == b[0] and (
            (a[0] == "cat" and len(a[1]) == len(b[1]))
            or (a[0] in ("tile", "rep") and a[2] == b[2])
        )
        if not same_shape:
            return False
        if a[0] == "cat":
            if [layout_size(p, self.size) for p in a[1]] != [
                layout_size(p, self.size) for p in b[1]
            ]:
                return False
            return all(self.unify(x, y) for x, y in zip(a[1], b[1]))
        return self.unify(a[1], b[1])

    def _chain(self, layout) -> list[int] | None:
        """The live groups a plain run of groups reads, or `None`."""
        lay = self.resolve(layout)
        if lay[0] == "leaf":
            return [lay[1]]
        if lay[0] != "cat":
            return None
        out = []
        for part in lay[1]:
            sub = self._chain(part)
            if sub is None:
                return None
            out += sub
        return out

    def _run(self, chain) -> int:
        return sum(self.size[g] for g in chain)

    def _bounds(self, chain) -> set[int]:
        return set(np.cumsum([self.size[g] for g in chain])[:-1].tolist())

    def _cut(self, chain, bounds) -> bool:
        """Splits the groups of `chain` that a bound falls inside."""
        cuts: dict[int, set[int]] = {}
        off = 0
        for g in chain:
            n = self.size[g]
            inside = {b - off for b in bounds if off < b < off + n}
            if inside:
                cuts.setdefault(g, set()).update(inside)
            off += n
        for g, at in cuts.items():
            edges = [0, *sorted(at), self.size[g]]
            self.parts[g] = tuple(
                self.new_group(b - a, f"{self.origin[g]}[{a}:{b}]")[1]
                for a, b in zip(edges, edges[1:])
            )
            for p in self.parts[g]:
                self.frozen[p] = list(self.frozen[g])
                self.inexact[p] = list(self.inexact[g])
        return bool(cuts)

    @staticmethod
    def rep(layout, m: int):
        """Every channel of `layout` repeated `m` times (depth multiplier)."""
        return layout if m == 1 else ("rep", layout, m)

    @staticmethod
    def tile(layout, t: int):
        """`t` copies of `layout` (Flatten: positions outer)."""
        return layout if t == 1 else ("tile", layout, t)

    @staticmethod
    def grid(outer, inner):
        """Every channel of `outer` with every channel of `inner`,
        outer-major (query head `k * g + j` of key/value head `k`)."""
        return ("grid", outer, inner)

    @staticmethod
    def cat(layouts):
        """The layouts laid end to end (channel-axis concatenation)."""
        return ("cat", tuple(layouts))

    def find(self, g: int) -> int:
        """The root id of group `g` (union-find)."""
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        for notes in (self.frozen, self.inexact):
            notes[ra] += [r for r in notes.pop(rb) if r not in notes[ra]]
