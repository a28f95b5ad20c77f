"""Channel spaces: the groups of an analysis, merged and split.

Every group starts as a run of `size` channels (`new_group`). Merges
(`unify`: an addition, a multiplication) make two runs one channel space
(a union-find over group ids). A split of a run (`split`: `ops.split` on the
channel axis, or an addition of a concatenation to one producer's output)
cuts a group into *parts*, groups of their own: a layout that reads the
group reads its parts laid end to end from then on (`resolve`), so the
layouts recorded before the split stay valid. A reshape that makes several
axes of one (an attention's projection reshaped to heads and head size)
cuts a group into *factors* the same way (`reshape`): the group then reads
as their product (nested `grid`s: every combination of one channel of
each, the last varying fastest).
"""

from __future__ import annotations

import math

import numpy as np

from keras_csgd.graph.layout import layout_size, leaves, map_leaves

NONE = "none"  # a factor of positions without channels: ("none", size)


class Spaces:
    """Group ids, their sizes, merges, splits and frozen reasons."""

    def __init__(self):
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.origin: dict[int, str] = {}
        self.frozen: dict[int, list[str]] = {}
        self.inexact: dict[int, list[str]] = {}
        self.parts: dict[int, tuple[int, ...]] = {}
        self.factors: dict[int, tuple[int, ...]] = {}
        self.weak_ids: set[int] = set()

    def new_group(self, size: int, origin: str, frozen: str | None = None):
        """A layout of `size` new channels (a new group)."""
        gid = len(self.parent)
        self.parent[gid] = gid
        self.size[gid] = int(size)
        self.origin[gid] = origin
        self.frozen[gid] = [frozen] if frozen else []
        self.inexact[gid] = []
        return ("leaf", gid)

    def weak(self, layout) -> None:
        """Marks `layout`'s groups as named after the groups they merge
        with (a traced layer's own variable, which joins the channels it
        is added to)."""
        self.weak_ids.update(leaves(layout))

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
        if r in self.parts:
            return ("cat", tuple(self._expand(p) for p in self.parts[r]))
        if r in self.factors:
            return self.product([self._expand(f) for f in self.factors[r]])
        return ("leaf", r)

    def live(self) -> list[int]:
        """The groups of the analysis: roots that are not split."""
        roots = {self.find(g) for g in self.parent}
        return sorted(roots - set(self.parts) - set(self.factors))

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
        if a[0] == b[0] == "cat" and len(a[1]) == len(b[1]):
            if [layout_size(p, self.size) for p in a[1]] != [
                layout_size(p, self.size) for p in b[1]
            ]:
                return False
            return all(self.unify(x, y) for x, y in zip(a[1], b[1]))
        return self._unify_factors(a, b)

    def _unify_factors(self, a, b) -> bool:
        """`unify` of layouts that repeat, tile or multiply channels: their
        factors, cut to the same sizes, pair up (groups with groups,
        positions without channels with their like)."""
        fa, fb = self._factor_list(a), self._factor_list(b)
        if self._total(fa) != self._total(fb):
            return False
        need = self._suffixes(fa) | self._suffixes(fb)
        cuts_a, cuts_b = self._cuts(fa, need), self._cuts(fb, need)
        if cuts_a is None or cuts_b is None:
            return False
        kinds = [[f[0] == NONE for f, n in self._refined(fs, cuts)
                  for _ in range(n)]
                 for fs, cuts in ((fa, cuts_a), (fb, cuts_b))]
        if kinds[0] != kinds[1]:
            return False
        fa, fb = self._cut_factors(fa, cuts_a), self._cut_factors(fb, cuts_b)
        return all(x[0] == NONE or self.unify(x, y) for x, y in zip(fa, fb))

    # ------------------------------------------------------ factors
    def reshape(self, axes, src, dst) -> list | None:
        """The layouts of the axes a reshape makes, or `None`.

        Args:
            axes: the layout of every input axis (`None`: no channels).
            src: the sizes of the input axes.
            dst: the sizes of the output axes (same product).

        Returns:
            One layout (or `None`: no channels) per output axis. Groups
            that the new axes cut are cut into factors. `None` when a cut
            falls where it cannot (inside a concatenation, or not on a
            multiple of the channels inside it).
        """
        factors = []
        for lay, n in zip(axes, src):
            factors += ([(NONE, n)] if lay is None
                        else self._factor_list(lay))
        if self._total(factors) != math.prod(dst):
            return None
        need = self._suffixes([(NONE, n) for n in dst])
        cuts = self._cuts(factors, need)
        if cuts is None:
            return None
        factors = self._cut_factors(factors, cuts)
        runs, k = [], len(factors)
        for n in reversed(dst):
            run, got = [], 1
            while k > 0 and (got < n or self._fsize(factors[k - 1]) == 1):
                if got == n and factors[k - 1][0] == NONE:
                    break
                k -= 1
                run.insert(0, factors[k])
                got *= self._fsize(factors[k])
            runs.insert(0, run)
        if any(f[0] != NONE for f in factors[:k]):
            if not runs:
                return None
            runs[0] = factors[:k] + runs[0]
        return [self._compose(run) for run in runs]

    def _factor_list(self, layout) -> list:
        """`layout` as factors, outermost first: live groups, concatenations
        (never cut) and `(NONE, n)` positions without channels."""
        lay = self.resolve(layout)
        kind = lay[0]
        if kind == "grid":
            return [*self._factor_list(lay[1]), *self._factor_list(lay[2])]
        if kind == "tile":
            return [(NONE, lay[2]), *self._factor_list(lay[1])]
        if kind == "rep":
            return [*self._factor_list(lay[1]), (NONE, lay[2])]
        return [lay]

    def _fsize(self, factor) -> int:
        if factor[0] == NONE:
            return factor[1]
        return layout_size(factor, self.size)

    def _total(self, factors) -> int:
        return math.prod(self._fsize(f) for f in factors)

    def _suffixes(self, factors) -> set[int]:
        """The products of the innermost `k` factors, for every `k`."""
        out, inner = {1}, 1
        for f in reversed(factors):
            inner *= self._fsize(f)
            out.add(inner)
        return out

    def _cuts(self, factors, need) -> dict[int, list[int]] | None:
        """`{factor index: sizes, outermost first}` for the factors that
        the suffix products `need` fall inside, or `None` (a cut inside a
        concatenation, or between multiples)."""
        cuts, inner = {}, 1
        for i in reversed(range(len(factors))):
            n = self._fsize(factors[i])
            inside = sorted(q for q in need if inner < q < inner * n)
            if inside:
                if factors[i][0] == "cat" or any(q % inner for q in inside):
                    return None
                edges = [1, *(q // inner for q in inside), n]
                if any(b % a for a, b in zip(edges, edges[1:])):
                    return None
                cuts[i] = [b // a for a, b in zip(edges, edges[1:])][::-1]
            inner *= n
        return cuts

    def _refined(self, factors, cuts):
        """`(factor, count)`: each factor and the number of pieces it is
        cut into."""
        return [(f, len(cuts.get(i, [0]))) for i, f in enumerate(factors)]

    def _cut_factors(self, factors, cuts) -> list:
        """The factors with the planned cuts made (groups cut into
        factors of their own)."""
        out = []
        for i, f in enumerate(factors):
            if i not in cuts:
                out.append(f)
            elif f[0] == NONE:
                out += [(NONE, n) for n in cuts[i]]
            else:
                out += self._factor(f[1], cuts[i])
        return out

    def _factor(self, g: int, sizes) -> list:
        """Live group `g` cut into factors of `sizes` (outermost first)."""
        self.factors[g] = tuple(
            self.new_group(n, f"{self.origin[g]}/factor{j}")[1]
            for j, n in enumerate(sizes)
        )
        for f in self.factors[g]:
            self.frozen[f] = list(self.frozen[g])
            self.inexact[f] = list(self.inexact[g])
        return [("leaf", f) for f in self.factors[g]]

    def _compose(self, run):
        """The layout of an axis made of `run`'s factors (`None`: no
        channels)."""
        run = list(run)
        outer = inner = 1
        while run and run[0][0] == NONE:
            outer *= run.pop(0)[1]
        while run and run[-1][0] == NONE:
            inner *= run.pop()[1]
        if not run:
            return None
        parts, gap = [], 1
        for f in run:
            if f[0] == NONE:
                gap *= f[1]
            else:
                parts.append(self.tile(f, gap))
                gap = 1
        core = self.product(parts)
        return self.tile(self.rep(core, inner), outer)

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

    @classmethod
    def product(cls, layouts):
        """Every combination of a channel of each layout, the last varying
        fastest: nested grids."""
        *outer, last = layouts
        for lay in reversed(outer):
            last = cls.grid(lay, last)
        return last

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
        if (rb in self.weak_ids, rb) < (ra in self.weak_ids, ra):
            ra, rb = rb, ra
        self.parent[rb] = ra
        for notes in (self.frozen, self.inexact):
            notes[ra] += [r for r in notes.pop(rb) if r not in notes[ra]]
