"""`LatencyTable`: measured latency of a model against group widths.

The table holds the full model's latency and, per prunable channel group,
the model's latency at a grid of widths with every other group at full
width (as `profile` estimates it: fitted to variants that narrow many groups
at once); per removable residual block, the latency its removal saves. It
predicts the full latency plus each group's measured change plus each
removed block's saving. Where groups meet in one layer (a convolution from
group `a` to group `b`), narrowing both saves less than the two changes
measured alone: with the layer calls' MACs and layouts (`calls`, from
`keras_csgd.flops`'s cost records), each group's change is scaled by the
MACs-weighted mean over its calls of `prod((1 + share) / 2)` over the call's
other layouts (exact for calls whose time is proportional to the product of
two layouts' kept shares), and calls dropped with a removed block no longer
count. It is stored as JSON in an on-disk cache, under a key of everything
the latency depends on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping

import numpy as np

FORMAT_VERSION = 3  # 2: widths fitted to multi-group variants; 3: checked
# Below this share of the full latency, predictions are `floored`.
FLOOR = 0.05


class LatencyTable:
    """Measured latency of one model on one runtime, per group width.

    Args:
        full: latency of the full model, in ms.
        groups: `{group_name: {"size": int, "widths": [int, ...],
            "ms": [float, ...]}}`: the model's latency with that group at
            each width (every other group at full width).
        blocks: `{add_name: {"saving_ms": float, "groups": [name, ...]}}`:
            the latency removing that residual block saves, and the groups
            that lie wholly inside its branch (they go with it). Defaults to
            `{}`.
        calls: `[{"op": layer name, "macs": int, "layouts": [{"groups":
            {group: entries}, "fixed": entries}, ...]}, ...]`: the layer
            calls whose MACs scale with the table's groups, and how many
            entries of each layout each group (or a frozen group, `fixed`)
            holds. Defaults to `()` (purely additive predictions).
        key: the cache key it was measured under (see `cache_key`).
            Defaults to `None`.
        fields: what the key was made of (runtime, batch size, machine,
            versions, ...). Defaults to `None`.

    Raises:
        ValueError: a non-positive `full`, a width outside `[1, size]`,
            widths and times of different lengths, a non-finite time, a
            block naming a group the table does not have.

    Example:

    ```python
    table = kc.latency.profile(model, runtime="litert", batch_size=1)
    table.full                                   # ms
    table.predict({"stem_conv": 8}, remove_blocks=["s1b1_add"])
    ```
    """

    def __init__(self, full: float, groups: Mapping[str, Mapping],
                 blocks: Mapping[str, Mapping] | None = None,
                 calls: Iterable[Mapping] = (), key: str | None = None,
                 fields: dict | None = None):
        if not (isinstance(full, (int, float)) and math.isfinite(full)
                and full > 0):
            raise ValueError(
                "`full` must be a positive latency in ms. "
                f"Received: full={full!r}"
            )
        self.full = float(full)
        self.groups = {}
        for name, g in groups.items():
            size, widths = int(g["size"]), [int(w) for w in g["widths"]]
            ms = [float(t) for t in g["ms"]]
            if len(widths) != len(ms) or not all(
                1 <= w <= size for w in widths
            ) or not all(math.isfinite(t) for t in ms):
                raise ValueError(
                    f"`groups[{name!r}]` needs as many widths (1 to its size "
                    f"{size}) as finite times. "
                    f"Received: groups[{name!r}]={dict(g)!r}"
                )
            self.groups[str(name)] = {"size": size, "widths": widths, "ms": ms}
        self.blocks = {}
        for name, b in (blocks or {}).items():
            inner = [str(g) for g in b.get("groups", ())]
            saving = float(b["saving_ms"])
            ops = [str(op) for op in b.get("ops", ())]
            if not set(inner) <= set(self.groups) or not math.isfinite(saving):
                raise ValueError(
                    f"`blocks[{name!r}]` must have a finite `saving_ms` and "
                    "name groups of the table. "
                    f"Received: blocks[{name!r}]={dict(b)!r}"
                )
            self.blocks[str(name)] = {
                "saving_ms": saving, "groups": inner, "ops": ops
            }
        self.calls = [
            {"op": str(c["op"]), "macs": float(c["macs"]),
             "layouts": [{"groups": {str(g): int(n)
                                     for g, n in lay["groups"].items()},
                          "fixed": int(lay.get("fixed", 0))}
                         for lay in c["layouts"]]}
            for c in calls
        ]
        unknown = {g for c in self.calls for lay in c["layouts"]
                   for g in lay["groups"]} - set(self.groups)
        if unknown:
            raise ValueError(
                "`calls` must name groups of the table. "
                f"Received: {sorted(unknown)[:5]}"
            )
        self.key = key
        self.fields = dict(fields or {})
        self.cached = False  # set by `profile` when read from the cache

    # ----------------------------------------------------------- queries
    def points(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Measured `(widths, ms)` of a group, full width included, widest
        first."""
        g = self._group(name)
        pairs = sorted({g["size"]: self.full,
                        **dict(zip(g["widths"], g["ms"]))}.items(),
                       reverse=True)
        return (np.array([w for w, _ in pairs]),
                np.array([t for _, t in pairs]))

    def step(self, name: str) -> int:
        """The multiple the group's widths were measured at (the greatest
        common divisor of its size and measured widths)."""
        g = self._group(name)
        return math.gcd(g["size"], *(int(w) for w in g["widths"]))

    def choices(self, name: str) -> list[tuple[int, float]]:
        """The widths worth choosing: the monotone lower envelope.

        Returns:
            `[(width, ms), ...]`, widest (the full width) first, each
            strictly faster than every wider width: a width that measures
            no faster than a wider one is left out.
        """
        out = []
        for w, t in zip(*self.points(name)):
            if not out or t < out[-1][1]:
                out.append((int(w), float(t)))
        return out

    def group_ms(self, name: str, width: float) -> float:
        """Latency with group `name` at `width` (fractional widths are
        interpolated linearly; below the narrowest measured width, the
        narrowest segment is extended)."""
        widths, ms = self.points(name)
        size = widths[0]
        if not 0 <= width <= size:
            raise ValueError(
                f"`widths[{name!r}]` must be in [0, {size}]. "
                f"Received: widths[{name!r}]={width!r}"
            )
        if width >= widths[-1] or len(widths) == 1:
            return float(np.interp(width, widths[::-1], ms[::-1]))
        slope = (ms[-2] - ms[-1]) / (widths[-2] - widths[-1])
        return float(ms[-1] - slope * (widths[-1] - width))

    def factors(self, widths: Mapping[str, float],
                remove_blocks: Iterable[str] = ()) -> dict[str, float]:
        """How much of each group's measured change applies at `widths`.

        Returns:
            `{group: factor}`: the MACs-weighted mean, over the calls that
            scale with the group (and are not dropped with a removed block),
            of `prod((1 + share) / 2)` over the call's layouts without the
            group; 1 for a group without calls.
        """
        sizes = {n: g["size"] for n, g in self.groups.items()}
        dropped = {op for b in remove_blocks for op in self.blocks[b]["ops"]}
        num = dict.fromkeys(self.groups, 0.0)
        den = dict.fromkeys(self.groups, 0.0)
        for c in self.calls:
            shares = []
            for lay in c["layouts"]:
                g = lay["groups"]
                kept = sum(n * widths.get(k, sizes[k]) for k, n in g.items())
                total = sum(n * sizes[k] for k, n in g.items())
                shares.append((set(g), (kept + lay["fixed"])
                               / (total + lay["fixed"])))
            for name in set().union(*(s for s, _ in shares)):
                den[name] += c["macs"]
                if c["op"] not in dropped:
                    num[name] += c["macs"] * math.prod(
                        (1 + share) / 2 for s, share in shares
                        if name not in s
                    )
        return {n: num[n] / den[n] if den[n] else 1.0 for n in self.groups}

    def predict(self, widths: Mapping[str, float],
                remove_blocks: Iterable[str] = ()) -> float:
        """Predicted latency (ms) at the given group widths and blocks.

        `full + sum((group_ms(g, w) - full) * factor[g]) - sum(saving)`
        (see `factors`), `floored` (never negative); the groups inside a
        removed block's branch do not count.

        Args:
            widths: `{group_name: width}` (fractional widths interpolate);
                groups not named stay at full width.
            remove_blocks: names of removed blocks (of `blocks`). Defaults
                to `()`.

        Returns:
            The predicted latency in ms.

        Raises:
            ValueError: an unknown group or block, a width out of range.
        """
        remove_blocks = list(remove_blocks)
        unknown = sorted(set(remove_blocks) - set(self.blocks))
        if unknown:
            raise ValueError(
                "`remove_blocks` must name blocks of the table "
                f"({sorted(self.blocks)[:8]}...). "
                f"Received: remove_blocks={unknown!r}"
            )
        gone = {g for b in remove_blocks for g in self.blocks[b]["groups"]}
        factors = self.factors(widths, remove_blocks)
        ms = self.full
        for name, w in widths.items():
            delta = self.group_ms(name, w) - self.full
            if name not in gone:
                ms += delta * factors[name]
        ms -= sum(self.blocks[b]["saving_ms"] for b in remove_blocks)
        return self.floored(ms)

    def floored(self, ms: float) -> float:
        """An additive sum of changes as a latency: never negative.

        Where measured changes overlap they can sum below 0. A clip would
        make every plan past that point look alike to the planner
        (MobileNetV2 on LiteRT at 2 threads), so below `FLOOR` of the full
        latency the sum is mapped to `floor * exp(ms / floor - 1)`: positive,
        increasing, and equal to `ms` (with its slope) at the floor.
        """
        floor = FLOOR * self.full
        return ms if ms >= floor else floor * math.exp(ms / floor - 1)

    def additive(self, ms: float) -> float:
        """The additive sum that `floored` maps to the latency `ms` > 0."""
        floor = FLOOR * self.full
        return ms if ms >= floor else floor * (1 + math.log(ms / floor))

    def shares(self) -> dict[str, float]:
        """Each group's and block's share of the full latency.

        A group's share is its latency change extended linearly to width 0
        from its narrowest measured width; a block's is its saving.

        Returns:
            `{group or block name: fraction of `full`}`.
        """
        out = {}
        for name in self.groups:
            widths, ms = self.points(name)
            if len(widths) > 1:
                drop = (self.full - ms[-1]) * widths[0] / (
                    widths[0] - widths[-1]
                )
                out[name] = max(0.0, drop) / self.full
        for name, b in self.blocks.items():
            out[name] = max(0.0, b["saving_ms"]) / self.full
        return out

    def _group(self, name):
        if name not in self.groups:
            raise ValueError(
                "`widths` must name groups of the table "
                f"({sorted(self.groups)[:8]}...). Received: {name!r}"
            )
        return self.groups[name]

    # ----------------------------------------------------------- JSON
    def to_json(self) -> str:
        """The table (and its key) as a JSON string."""
        return json.dumps({
            "format_version": FORMAT_VERSION, "key": self.key,
            "fields": self.fields, "full_ms": self.full,
            "groups": self.groups, "blocks": self.blocks,
            "calls": self.calls,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        """Inverse of `to_json`.

        Raises:
            ValueError: not a latency table of this format version.
        """
        try:
            d = json.loads(text)
            if d.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {d.get('format_version')!r}")
            return cls(d["full_ms"], d["groups"], d.get("blocks"),
                       d.get("calls", ()), key=d.get("key"),
                       fields=d.get("fields"))
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise ValueError(
                f"`text` is not a keras_csgd latency table ({e})."
            ) from e

    def __repr__(self) -> str:
        return (
            f"LatencyTable(full={self.full:.3f} ms, "
            f"{len(self.groups)} groups, {len(self.blocks)} blocks)"
        )


# --------------------------------------------------------------- cache
def cache_dir(path=None) -> str:
    """`path`, else `$KERAS_CSGD_CACHE/latency`, else
    `~/.cache/keras_csgd/latency`."""
    if path is not None:
        return os.fspath(path)
    root = os.environ.get("KERAS_CSGD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_csgd"
    )
    return os.path.join(root, "latency")


def cache_key(fields: dict) -> str:
    """SHA-256 of the canonical JSON of `fields`."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load(folder: str, key: str, groups: Iterable[str]) -> LatencyTable | None:
    """The cached table of `key`, or `None` (missing, corrupt, foreign).

    A file that does not parse, was written under another key or does not
    cover exactly `groups` is not trusted: a warning says so and `None`
    comes back, so that the table is measured again (and overwritten).
    """
    path = os.path.join(folder, f"{key}.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            table = LatencyTable.from_json(f.read())
        if table.key != key:
            raise ValueError(f"it was written under key {table.key!r}")
        if set(table.groups) != set(groups):
            raise ValueError("its groups are not the model's")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        warnings.warn(
            f"Ignoring the latency cache file {path} ({e}); measuring again.",
            stacklevel=3,
        )
        return None
    table.cached = True
    return table


def save(folder: str, table: LatencyTable) -> str:
    """Writes `table` to `folder/<key>.json` atomically; returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{table.key}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(table.to_json())
    os.replace(tmp, path)
    return path
