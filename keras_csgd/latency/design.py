"""The variants `profile` times, and what they are made of.

Structurally identical groups form classes (`group_classes`), identical
removable residual blocks likewise (`block_classes`); `width_variants`
narrow many classes at once to grid widths (`grid_widths`), and
`design_matrix` is the least-squares problem `profile` fits to their timed
changes. `width_plan` makes a variant's plan, `variant` the variant;
`cost_calls` gives the table the MACs records that scale with each group.
"""

from __future__ import annotations

import json
from collections import Counter

import keras
import numpy as np

from keras_csgd import blocks, graph
from keras_csgd.clusters import target_width
from keras_csgd.layers.registry import handler_for
from keras_csgd.plan import PruningPlan
from keras_csgd.surgery import slim

GRID = (0.75, 0.5, 0.25)


def prunable_groups(model, an: graph.Analysis) -> list[str]:
    """Names of the prunable groups; `ValueError` when there is none."""
    names = [g.name for g in an.groups if g.prunable]
    if not names:
        raise ValueError(
            "`model` has no prunable channel group ("
            + "; ".join(f"{g.name}: {g.reason}" for g in an.groups[:5])
            + f"). Received: model={model.name!r}"
        )
    return names


def channel_step(size: int, block: int = 8) -> int:
    """The multiple a group of `size` channels is measured and kept at:
    the runtime's channel `block` (`Runtime.channel_block`: 8, or 16 for
    ONNX Runtime and OpenVINO with AVX-512) from 32 channels on, 4 below
    (1 below 8 channels)."""
    return block if size >= 32 else 4 if size >= 8 else 1


def grid_widths(size: int, grid=GRID, block: int = 8) -> list[int]:
    """Widths measured for a group of `size`: `grid` fractions rounded to
    multiples of `channel_step(size, block)`, narrower than `size`."""
    step = channel_step(size, block)
    widths = {target_width(size, f, step) for f in grid}
    return sorted((w for w in widths if w < size), reverse=True)


def _layer_signature(layer) -> str:
    handler = handler_for(layer)  # its `config` where `get_config` fails
    config = handler.config(layer) if handler else layer.get_config()
    config = {k: v for k, v in config.items() if k != "name"}
    shapes = []
    for attr in ("input", "output"):
        try:
            shapes.append(str(keras.tree.map_structure(
                lambda t: tuple(t.shape), getattr(layer, attr))))
        except (AttributeError, ValueError):
            shapes.append(None)
    return json.dumps([type(layer).__name__, config, shapes], default=str)


def group_classes(an: graph.Analysis, names) -> list[list[str]]:
    """Groups of `names` with the same size and the same layers."""
    classes: dict[tuple, list[str]] = {}
    groups = {g.name: g for g in an.groups}
    for name in names:
        g = groups[name]
        sig = tuple(sorted(
            (role, _layer_signature(an.layers[lname]),
             path.rsplit("/", 1)[-1], axis)
            for role, entries in (("m", g.members), ("c", g.consumers))
            for lname, path, axis in entries
        ))
        classes.setdefault((g.size, sig), []).append(name)
    return list(classes.values())


def removable_blocks(model, an: graph.Analysis) -> dict[str, list[str]]:
    """`{add_name: inner prunable groups}` of the blocks a plan may remove.

    A block qualifies when its branch holds at least one prunable group
    wholly (those groups go with the branch), no other block's Add, and no
    group of another qualifying block.
    """
    names = blocks.residual_blocks(model)
    shortcuts = blocks.block_shortcuts(model, names)
    out, seen = {}, set()
    for name in names:
        ops = blocks.branch(model, name, shortcuts[name])[1]
        if ops & set(names):
            continue
        inner = [
            g.name for g in an.groups if g.prunable and all(
                lname.split("/")[0] in ops for lname, _, _ in g.members
            )
        ]
        if inner and not seen & set(inner):
            out[name] = inner
            seen |= set(inner)
    return out


def block_classes(model, names) -> list[list[str]]:
    """Blocks of `names` whose branches and Adds are identical."""
    shortcuts = blocks.block_shortcuts(model, names)
    classes: dict[tuple, list[str]] = {}
    for name in names:
        ops = blocks.branch(model, name, shortcuts[name])[1]
        sig = tuple(sorted(_layer_signature(model.get_layer(op))
                           for op in ops | {name}))
        classes.setdefault((shortcuts[name], sig), []).append(name)
    return list(classes.values())


def cost_calls(an: graph.Analysis, names) -> list[dict]:
    """The analysis' MACs records (`graph.Cost`) that scale with `names`,
    as `LatencyTable` calls."""
    name_of = {an.gid_of[n]: n for n in names}
    out = []
    for cost in an.costs:
        if not cost.macs:
            continue
        layouts = []
        factors = [f for c in cost.layouts for f in _factors(an.root(c))]
        for lay in factors:
            gids, _ = graph.group_maps(lay, an.sizes)[0]
            counts = Counter(gids.tolist())
            groups = {name_of[g]: n for g, n in counts.items() if g in name_of}
            if groups:
                layouts.append({"groups": groups, "fixed": int(
                    sum(n for g, n in counts.items() if g not in name_of))})
        if layouts:
            out.append({"op": cost.lname.split("/")[0], "macs": cost.macs,
                        "layouts": layouts})
    return out


def _factors(layout) -> list:
    """A layout as layouts whose kept shares multiply to its own: the two
    sides of a grid (heads and head size), apart."""
    if layout[0] == "grid":
        return [*_factors(layout[1]), *_factors(layout[2])]
    return [layout]


def width_variants(options, seed: int = 0) -> list[dict[int, int]]:
    """The width variants to profile, as `{class index: width}`.

    `options[i]` are class `i`'s grid widths. With `P` of them in all, the
    first variants narrow every class to its `k`-th widest option (one per
    grid width); the rest (enough for `P + max(grid, P / 3)` variants in
    all) are random and balanced: each class is left at full width in half
    of them and at each of its widths equally often in the others, in an
    order of its own (a seeded permutation per class), so that classes are
    narrowed independently of each other.
    """
    rng = np.random.default_rng(seed)
    params = sum(len(o) for o in options)
    uniform = max(len(o) for o in options)
    rows = [{i: o[min(k, len(o) - 1)] for i, o in enumerate(options) if o}
            for k in range(uniform)]
    count = params + max(uniform, -(-params // 3)) - uniform
    levels = []
    for o in options:
        cycle = [x for w in o for x in (None, w)]
        levels.append(rng.permutation(
            np.array((cycle * count)[:count], dtype=object)
        ) if o else [None] * count)
    rows += [{i: lv[r] for i, lv in enumerate(levels) if lv[r] is not None}
             for r in range(count)]
    return rows


def design_matrix(table, classes, options, rows) -> np.ndarray:
    """`X[r, j]`: in variant `r`, the number of groups of parameter `j`'s
    class at its width, each weighted by its interaction factor
    (`LatencyTable.factors`); parameter `j` runs over `(class, width)` in
    the order of `options`."""
    columns = {(i, w): j for j, (i, w) in enumerate(
        (i, w) for i, o in enumerate(options) for w in o)}
    x = np.zeros((len(rows), len(columns)))
    for r, row in enumerate(rows):
        factors = table.factors(
            {n: w for i, w in row.items() for n in classes[i]})
        for i, w in row.items():
            x[r, columns[i, w]] = sum(factors[n] for n in classes[i])
    return x


def full_rank_design(table, classes, options, seed):
    """`width_variants` and their design matrix, with more random variants
    (other seeds) while the matrix lacks full column rank."""
    rows = width_variants(options, seed)
    x = design_matrix(table, classes, options, rows)
    extra, uniform = seed, max(len(o) for o in options)
    while np.linalg.matrix_rank(x) < x.shape[1] and extra < seed + 8:
        extra += 1
        more = width_variants(options, extra)[uniform:]
        rows += more
        x = np.vstack([x, design_matrix(table, classes, options, more)])
    return rows, x


def width_plan(model, an: graph.Analysis, widths,
               remove_blocks=()) -> PruningPlan:
    """A plan of the first `widths[g]` channels of each group (the slim
    architecture only: latency does not depend on which channels)."""
    plan = PruningPlan(
        {g: [[i] for i in range(w)] for g, w in widths.items()},
        groups=an.groups, remove_blocks=remove_blocks,
    )
    plan.analysis = (model, an)
    return plan


def variant(model, an: graph.Analysis, widths, remove_blocks=()):
    """The slim variant of `model` at `widths` without `remove_blocks`
    (`model` itself for `widths=None`)."""
    if widths is None:
        return model
    return slim(model, width_plan(model, an, widths, remove_blocks),
                check=False)
