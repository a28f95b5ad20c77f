"""`profile`: measure how a model's latency depends on its group widths.

Method: whole slim variants of the model are timed, interleaved with the
full model, on the runtime itself (not per-layer micro-benchmarks summed:
XNNPACK and XLA fuse layers and pay per-op costs that a sum of isolated
layers misses). Structurally identical groups (the same layers, configs,
shapes and size, such as the inner groups of one ResNet stage) form one
*class*, always at one width. The width variants narrow many classes at
once, each to a random grid width or none (a balanced random design, plus
one variant per grid width that narrows every class), and each class's
change at each width is fitted to all of them by least squares, in the
form the table predicts with (`LatencyTable.predict`: changes scaled by
their interactions). Narrowing one group of a small layer alone changes
the latency by about as much as timing noise (MobileNetV2 on LiteRT), and
less than its share where the runtime's per-op costs or thread scheduling
do not scale with one layer; a variant that narrows half the classes moves
it well above noise, every variant informs every estimate, and the
estimates hold where plans live, with most groups narrowed. Identical
residual blocks are removed at once, one class per variant, since removing
a block changes the latency well above noise.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import keras
import numpy as np

from keras_csgd import blocks, checks, graph
from keras_csgd.clusters import target_width
from keras_csgd.latency import table as tables
from keras_csgd.latency import timing
from keras_csgd.plan import PruningPlan
from keras_csgd.surgery import slim

GRID = (0.75, 0.5, 0.25)
# Per variant: blocks of about 5 ms in as many rounds (5 to 51) as fit in
# 1 s of timing.
PROFILE_TIMING = {"block_ms": 5.0, "budget_ms": 1000.0, "rounds": (5, 51)}


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


def grid_widths(size: int, grid=GRID) -> list[int]:
    """Widths measured for a group of `size`: `grid` fractions rounded to
    multiples of 8 (of 4 below 32 channels), narrower than `size`."""
    step = 8 if size >= 32 else 4 if size >= 8 else 1
    widths = {target_width(size, f, step) for f in grid}
    return sorted((w for w in widths if w < size), reverse=True)


def _layer_signature(layer) -> str:
    config = {k: v for k, v in layer.get_config().items() if k != "name"}
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
        for lay in cost.layouts:
            gids, _ = graph.flat_channels(an.root(lay), an.sizes)
            counts = Counter(gids.tolist())
            groups = {name_of[g]: n for g, n in counts.items() if g in name_of}
            if groups:
                layouts.append({"groups": groups, "fixed": int(
                    sum(n for g, n in counts.items() if g not in name_of))})
        if layouts:
            out.append({"op": cost.lname.split("/")[0], "macs": cost.macs,
                        "layouts": layouts})
    return out


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


def _full_rank_design(table, classes, options, seed):
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


def key_fields(model, runtime, batch_size, threads, jit_compile,
               grid) -> dict:
    """Everything a latency table depends on (the cache key's input)."""
    import tensorflow as tf

    fields = {
        "model": tables.cache_key({"config": model.to_json()}),
        "runtime": runtime, "batch_size": batch_size, "grid": list(grid),
        "machine": timing.machine(), "versions": timing.versions(),
        "format_version": tables.FORMAT_VERSION,
    }
    if runtime == "litert":
        fields["threads"] = threads
    else:
        threading = tf.config.threading
        fields["threads"] = threading.get_intra_op_parallelism_threads()
        fields["jit_compile"] = jit_compile
    return fields


class _Timer:
    """Latency changes of variants against the full model."""

    def __init__(self, model, runtime, batch_size, threads, jit_compile,
                 rounds, measure):
        self.measure = measure
        self.args = (runtime, batch_size, threads, jit_compile)
        self.fulls = []
        if measure is None:
            self.full = timing.runner(model, *self.args)
            limits = PROFILE_TIMING["rounds"] if rounds is None else (
                rounds, rounds)
            self.calls, self.rounds = timing.schedule(
                self.full, PROFILE_TIMING["block_ms"],
                PROFILE_TIMING["budget_ms"], limits,
            )
        else:
            self.fulls.append(float(measure(model)))

    def delta(self, variant) -> float:
        if self.measure is not None:
            return float(self.measure(variant)) - self.fulls[0]
        stats = timing.fastest_blocks(*timing.interleaved(
            self.full, timing.runner(variant, *self.args), self.rounds,
            self.calls,
        ))
        self.fulls.append(stats["first_ms"])
        return stats["delta_ms"]


def profile(model, runtime: str = "litert", batch_size: int = 1, *,
            threads: int | None = None, grid=GRID, rounds: int | None = None,
            jit_compile="auto", cache_dir=None, measure=None,
            verbose: int = 1) -> tables.LatencyTable:
    """Measures `model`'s latency per group width and per removed block.

    Identical prunable groups form classes (always at one width). Slim
    variants that narrow many classes at once, each to a width of the grid
    (`grid_widths`) or none (`width_variants`: one variant per grid width
    narrowing every class, then a balanced random design; about 1.33 times
    as many variants as (class, width) pairs), are built (`kc.slim`) and
    timed interleaved with the full model (rounds of blocks of about 5 ms,
    as many as fit 1 s; each model's latency is its fastest block median,
    see `timing.fastest_blocks`). Each class's change at each width is the
    least-squares fit to all variants of the table's own prediction
    (changes scaled by their interactions, `LatencyTable.factors`), shared
    equally among its groups; `table.fields["fit_rms_ms"]` is the fit's
    residual. Every class of identical removable blocks is removed in one
    variant of its own.
    removable blocks. A Keras progress bar shows the variants. The table is
    cached on disk under a key of the model's structure (its config JSON),
    the runtime, batch size, threads, the CPU model and SIMD flags, GPUs and
    the library versions: a second call is instant, another machine measures
    again. A cache file that is corrupt or was written under another key is
    measured again, not trusted.

    Args:
        model: a functional or Sequential single-input `keras.Model`.
        runtime: `"litert"` (float32 LiteRT interpreter, XNNPACK) or
            `"tensorflow"` (compiled Keras call, BatchNormalization folded,
            on TensorFlow's device). Defaults to `"litert"`.
        batch_size: batch size of a call. Defaults to `1`.
        threads: LiteRT interpreter threads (TensorFlow keeps its own
            setting, see `kc.export.set_tf_threads`). Defaults to `None`:
            the usable cores.
        grid: fractions of each group's width to measure. Defaults to
            `(0.75, 0.5, 0.25)`.
        rounds: interleaved rounds per variant. Defaults to `None` (5 to
            51, as many as fit 1 s).
        jit_compile: compile the TensorFlow call with XLA: `True`, `False`
            or `"auto"` (XLA where TensorFlow has a GPU, see
            `kc.latency.timing.xla`). Defaults to `"auto"`.
        cache_dir: folder of the cache. Defaults to `None`:
            `$KERAS_CSGD_CACHE/latency`, else `~/.cache/keras_csgd/latency`.
        measure: a function `model -> ms` used instead of timing (tests,
            simulated devices); nothing is cached then. Defaults to `None`.
        verbose: `1` shows a progress bar. Defaults to `1`.

    Returns:
        A `LatencyTable`; `table.cached` says whether it came from the cache.

    Raises:
        ValueError: an unknown `runtime`, `batch_size < 1`, bad `threads`,
            `grid` or `rounds`, a model without a prunable group.

    Example:

    ```python
    table = kc.latency.profile(model, runtime="litert", batch_size=1)
    table.shares()  # each group's and block's share of the latency
    ```
    """
    checks.choice("runtime", runtime, timing.RUNTIMES)
    checks.positive_int("batch_size", batch_size)
    threads = checks.positive_int("threads", threads, allow_none=True)
    threads = timing.cores() if threads is None else threads
    checks.positive_int("rounds", rounds, allow_none=True)
    jit_compile = timing.xla(jit_compile)
    if isinstance(grid, str) or not grid:
        raise ValueError(
            f"`grid` must be fractions in (0, 1). Received: grid={grid!r}"
        )
    for f in grid:
        checks.fraction("grid", f, high_closed=False)
    an = graph.analyze(model)
    prunable = prunable_groups(model, an)
    folder = tables.cache_dir(cache_dir)
    fields = key_fields(model, runtime, batch_size, threads, jit_compile,
                        grid)
    key = tables.cache_key(fields)
    if measure is None:
        cached = tables.load(folder, key, prunable)
        if cached is not None:
            return cached
    start = time.perf_counter()
    sizes = {g.name: g.size for g in an.groups}
    inner = removable_blocks(model, an)
    calls = cost_calls(an, prunable)
    groups = {n: {"size": sizes[n], "widths": [], "ms": []} for n in prunable}
    shape = tables.LatencyTable(1.0, groups, calls=calls)  # for `factors`
    classes = [names for names in group_classes(an, prunable)
               if grid_widths(sizes[names[0]], grid)]
    options = [grid_widths(sizes[names[0]], grid) for names in classes]
    rows, x = (_full_rank_design(shape, classes, options, 0) if classes
               else ([], np.zeros((0, 0))))
    work = [({n: w for i, w in row.items() for n in classes[i]}, ())
            for row in rows]
    work += [({}, names) for names in block_classes(model, list(inner))]
    bar = keras.utils.Progbar(len(work), verbose=verbose,
                              unit_name="variant")
    timer = _Timer(model, runtime, batch_size, threads, jit_compile, rounds,
                   measure)
    deltas = []
    for k, (widths, removed) in enumerate(work):
        variant = slim(model, width_plan(model, an, widths, removed),
                       check=False)
        deltas.append(timer.delta(variant))
        bar.update(k + 1)
    full = float(sorted(timer.fulls)[len(timer.fulls) // 2])
    y = np.array(deltas[:len(rows)])
    if classes:
        effects = np.linalg.lstsq(x, y, rcond=None)[0]
        fields["fit_rms_ms"] = float(np.sqrt(np.mean((x @ effects - y) ** 2)))
        params = [(i, w) for i, o in enumerate(options) for w in o]
        for (i, w), effect in zip(params, effects):
            for n in classes[i]:
                groups[n]["widths"].append(w)
                groups[n]["ms"].append(full + float(effect))
    block_rows = {}
    for (_, removed), delta in zip(work[len(rows):], deltas[len(rows):]):
        for n in removed:
            block_rows[n] = {
                "saving_ms": -delta / len(removed), "groups": inner[n],
                "ops": sorted(blocks.dropped_operations(model, [n])),
            }
    fields["profile_seconds"] = round(time.perf_counter() - start, 1)
    table = tables.LatencyTable(full, groups, block_rows, calls, key=key,
                                fields=fields)
    if measure is None:
        tables.save(folder, table)
    return table
