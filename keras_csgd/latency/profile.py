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

import time
import warnings

import numpy as np

from keras_csgd import blocks, checks, graph, runtimes
from keras_csgd.latency import design, quality, sweep, timing, writers
from keras_csgd.latency import table as tables
from keras_csgd.latency.design import GRID
from keras_csgd.runtimes.tensorflow import xla

# Variants the fit does not see, timed to check its predictions.
HELD_OUT = 4


def key_fields(model, runtime, batch_size, threads, jit_compile,
               grid) -> dict:
    """Everything a latency table depends on (the cache key's input): the
    model's structure, the runtime and its packages' versions, batch size,
    threads, grid, the machine."""
    import tensorflow as tf

    fields = {
        "model": tables.cache_key({"config": model.to_json()}),
        "runtime": runtime, "batch_size": batch_size, "grid": list(grid),
        "machine": timing.machine(), "versions": timing.versions(runtime),
        "format_version": tables.FORMAT_VERSION,
    }
    rt = runtimes.get(runtime)
    block = rt.channel_block(fields["machine"]["simd"])
    if block != 8:  # the widths measured (8: tables cached before it)
        fields["channel_block"] = block
    if rt.block_statistic != "fastest":  # (fastest: tables before it)
        fields["block_statistic"] = rt.block_statistic
    if runtime != "tensorflow":
        fields["threads"] = threads
    else:
        threading = tf.config.threading
        fields["threads"] = threading.get_intra_op_parallelism_threads()
        fields["jit_compile"] = jit_compile
    return fields


class _Design:
    """What `profile` times: width variants (the fit's rows), one variant
    per class of identical blocks, and held-out width variants."""

    def __init__(self, model, an, prunable, grid, block):
        sizes = {g.name: g.size for g in an.groups}
        self.inner = design.removable_blocks(model, an)
        self.calls = design.cost_calls(an, prunable)
        self.skeleton = {n: {"size": sizes[n], "widths": [], "ms": []}
                         for n in prunable}
        shape = tables.LatencyTable(1.0, self.skeleton, calls=self.calls)
        self.classes = [
            names for names in design.group_classes(an, prunable)
            if design.grid_widths(sizes[names[0]], grid, block)]
        self.options = [design.grid_widths(sizes[names[0]], grid, block)
                        for names in self.classes]
        rows, self.x = (
            design.full_rank_design(shape, self.classes, self.options, 0)
            if self.classes else ([], np.zeros((0, 0))))
        held = []
        if self.classes:
            uniform = max(len(o) for o in self.options)
            held = design.width_variants(self.options, seed=1 << 16)[
                uniform:uniform + HELD_OUT]
        self.rows, self.held = len(rows), len(held)
        self.work = [(self.widths(row), ()) for row in rows]
        self.work += [({}, names) for names in
                      design.block_classes(model, list(self.inner))]
        self.work += [(self.widths(row), ()) for row in held]

    def widths(self, row) -> dict:
        return {n: w for i, w in row.items() for n in self.classes[i]}

    def table(self, model, full, deltas, key, fields) -> tuple:
        """`(table, errors)`: the table fitted to one attempt's `deltas`
        (one per `work`), and `{group: {width: standard error (ms)}}` of
        its fitted widths (from the residual, with the fit's degrees of
        freedom; infinite without any)."""
        groups = {n: {**g, "widths": [], "ms": []}
                  for n, g in self.skeleton.items()}
        fields, errors = dict(fields), {n: {} for n in groups}
        y = np.array(deltas[:self.rows])
        if self.classes:
            effects, _, rank, _ = np.linalg.lstsq(self.x, y, rcond=None)
            squares = np.sum((self.x @ effects - y) ** 2)
            fields["fit_rms_ms"] = float(np.sqrt(squares / len(y)))
            free = len(y) - rank
            sigma = np.sqrt(squares / free) if free > 0 else np.inf
            se = sigma * np.sqrt(np.diag(np.linalg.pinv(self.x.T @ self.x)))
            params = [(i, w) for i, o in enumerate(self.options) for w in o]
            for (i, w), effect, e in zip(params, effects, se):
                for n in self.classes[i]:
                    groups[n]["widths"].append(w)
                    groups[n]["ms"].append(full + float(effect))
                    errors[n][w] = float(e)
        block_rows = {}
        end = len(self.work) - self.held
        for (_, removed), delta in zip(self.work[self.rows:end],
                                       deltas[self.rows:end]):
            for n in removed:
                block_rows[n] = {
                    "saving_ms": -delta / len(removed),
                    "groups": self.inner[n],
                    "ops": sorted(blocks.dropped_operations(model, [n])),
                }
        return tables.LatencyTable(full, groups, block_rows, self.calls,
                                   key=key, fields=fields), errors

    def checked(self, model, full, deltas, key, fields, max_error,
                reproduced=frozenset()) -> tuple:
        """`(fit residual, table, problems)` of the table fitted to
        `deltas` (`quality.problems`); `table.fields["runtime_effects"]`
        lists the order violations beyond noise or `reproduced` in every
        measurement (`quality.runtime_effects`)."""
        table, errors = self.table(model, full, deltas, key, fields)
        wrong = quality.problems(table, self.held_out(deltas), max_error,
                                 errors, reproduced)
        table.fields["runtime_effects"] = quality.runtime_effects(
            table, errors, max_error, reproduced)
        return table.fields.get("fit_rms_ms", 0.0), table, wrong

    def held_out(self, deltas) -> list:
        """`(widths, measured change)` of the held-out variants."""
        start = len(self.work) - self.held
        return [(w, d) for (w, _), d in zip(self.work[start:],
                                            deltas[start:])]


def _served(model, an, rt, inner, measure) -> tuple:
    """`(model, analysis)` that variants are built from: the model as
    `rt` serves it (TensorFlow's BN-folded model), where its prunable
    groups (names and sizes) and removable blocks (`inner`, the model's)
    are the model's, else the model itself."""
    if measure is not None:
        return model, an
    served = rt.served(model)
    if served is model:
        return model, an
    served_an = graph.analyze(served)

    def sizes(a):
        return {g.name: g.size for g in a.groups if g.prunable}

    if (sizes(served_an) != sizes(an) or sorted(
            design.removable_blocks(served, served_an)) != sorted(inner)):
        return model, an
    return served, served_an


def profile(model, runtime: str = "litert", batch_size: int = 1, *,
            threads: int | None = None, grid=GRID, rounds: int | None = None,
            jit_compile="auto", cache_dir=None, measure=None,
            max_error: float | None = None, attempts: int = 2,
            verbose: int = 1) -> tables.LatencyTable:
    """Measures `model`'s latency per group width and per removed block.

    Identical prunable groups form classes (always at one width). Slim
    variants that narrow many classes at once, each to a width of the grid
    (`design.grid_widths`) or none (`design.width_variants`: one variant per
    grid width narrowing every class, then a balanced random design; about
    1.33 times as many variants as (class, width) pairs; from 32 channels on,
    widths are multiples of the runtime's channel block,
    `Runtime.channel_block`), are built (`kc.slim` of the model as the runtime
    serves it, `Runtime.served`: for TensorFlow the BN-folded model), written
    once for the runtime (`Runtime.quick_write`: the graph `kc.export` writes,
    converted the quickest way, all before any timing and on every core, see
    `keras_csgd.latency.writers`; TensorFlow compiles each variant once
    instead) and timed interleaved with the full model (`timing.Pair`: rounds
    of blocks of about 5 ms, as many as fit 1 s; each model's latency is its
    fastest block median, see `timing.fastest_blocks`, or for TensorFlow its
    median block; ONNX Runtime and OpenVINO time each model in a process of
    its own). A variant's change is its latency over the full model's timed
    with it, times the full model's median latency, so that a slow phase of
    the machine, which slows both, cancels. Each class's change at each width
    is the least-squares fit to all variants of the table's own prediction
    (changes scaled by their interactions, `LatencyTable.factors`), shared
    equally among its groups; `table.fields["fit_rms_ms"]` is the fit's
    residual. Every class of identical removable blocks is removed in one
    variant of its own. A Keras progress bar shows the variants.

    Before it is cached the table checks itself (`quality.problems`: fit
    residual, predictions for 4 held-out variants, no narrower width that
    measures slower beyond `max_error` and within the noise of the fit,
    no removed block that measures slower beyond `max_error`). A narrower
    width that measures slower beyond noise is the runtime's and is
    listed in `table.fields["runtime_effects"]`. A table that fails is
    timed again from scratch (the same files, not converted again), up to
    `attempts` times in all, and the mean of the call's measurements is
    fitted as well (`fields["measurements_averaged"]`), where a width slower
    than a wider one of its group in every measurement is the runtime's
    too; when no fit is clean, the one with the smallest residual is kept,
    a warning says what is wrong, and `table.fields["checks"]` records it
    (`{"clean", "attempts", "problems"}`, `attempts` counting every
    measurement of the table), also in the cache. A cached table that
    failed its checks is not reused as it is: the next call measures again
    (up to `attempts` times more) and keeps the better of the old and the
    new (a clean one first, then the smaller residual), so a table measured
    on a busy machine is replaced once it is quiet. One that has failed
    `2 * attempts` measurements, over two calls, is read back with a
    warning: its problems hold on this machine.

    The table is cached on disk under a key of the model's structure (its
    config JSON), the runtime and its packages' versions, batch size,
    threads, the CPU model and SIMD flags, GPUs and the library versions: a
    second call is instant, another machine or runtime version measures
    again. A cache file that is corrupt or was written under another key is
    measured again, not trusted.

    Args:
        model: a functional or Sequential single-input `keras.Model`.
        runtime: one of `kc.latency.RUNTIMES`: `"litert"` (float32 LiteRT
            interpreter, XNNPACK), `"litert-float16"`, `"litert-dynamic"`,
            `"litert-int8"` (full-integer), `"onnxruntime"` (CPU execution
            provider), `"openvino"` (CPU plugin) or `"tensorflow"`
            (compiled Keras call, BatchNormalization folded, on
            TensorFlow's device). Defaults to `"litert"`.
        batch_size: batch size of a call. Defaults to `1`.
        threads: the runtime's threads (TensorFlow keeps its own setting,
            see `kc.runtimes.tensorflow.set_tf_threads`). Defaults to
            `None`: the usable cores.
        grid: fractions of each group's width to measure. Defaults to
            `(0.75, 0.5, 0.25)`.
        rounds: interleaved rounds per variant. Defaults to `None` (5 to
            51, as many as fit 1 s).
        jit_compile: compile the TensorFlow call with XLA: `True`, `False`
            or `"auto"` (XLA where TensorFlow has a GPU, see
            `kc.runtimes.tensorflow.xla`). Defaults to `"auto"`.
        cache_dir: folder of the cache. Defaults to `None`:
            `$KERAS_CSGD_CACHE/latency`, else `~/.cache/keras_csgd/latency`.
        measure: a function `model -> ms` used instead of timing (tests,
            simulated devices); nothing is cached then. Defaults to `None`.
        max_error: the share of the full latency the checks allow.
            Defaults to `None`: the runtime's (`Runtime.profile_error`),
            3% (TensorFlow: 6%, its calls vary twice as much as LiteRT's
            by themselves).
        attempts: most measurements of the whole table. Defaults to `2`.
        verbose: `1` shows a progress bar. Defaults to `1`.

    Returns:
        A `LatencyTable`; `table.cached` says whether it came from the cache.

    Raises:
        ValueError: an unknown `runtime`, `batch_size < 1`, bad `threads`,
            `grid`, `rounds`, `max_error` or `attempts`, a model without a
            prunable group.
        ImportError: the runtime's package is missing.

    Example:

    ```python
    table = kc.latency.profile(model, runtime="onnxruntime", batch_size=1)
    table.shares()  # each group's and block's share of the latency
    ```
    """
    checks.choice("runtime", runtime, timing.RUNTIMES)
    checks.positive_int("batch_size", batch_size)
    threads = checks.positive_int("threads", threads, allow_none=True)
    threads = timing.cores() if threads is None else threads
    checks.positive_int("rounds", rounds, allow_none=True)
    checks.positive_int("attempts", attempts)
    rt = runtimes.get(runtime)
    if max_error is None:
        max_error = rt.profile_error or quality.MAX_ERROR
    checks.number("max_error", max_error, low=0.0)
    jit_compile = xla(jit_compile)
    if isinstance(grid, str) or not grid:
        raise ValueError(
            f"`grid` must be fractions in (0, 1). Received: grid={grid!r}"
        )
    for f in grid:
        checks.fraction("grid", f, high_closed=False)
    rt.require()
    an = graph.analyze(model)
    prunable = design.prunable_groups(model, an)
    folder = tables.cache_dir(cache_dir)
    fields = key_fields(model, runtime, batch_size, threads, jit_compile,
                        grid)
    key = tables.cache_key(fields)
    tries, measured = [], 0
    if measure is None:
        cached = tables.load(folder, key, prunable)
        if cached is not None:
            checked = cached.fields.get("checks", {})
            if checked.get("clean", True):
                return cached
            measured = checked.get("attempts", 1)
            if measured >= 2 * attempts:
                # Measured again in a later call already: what fails
                # holds on this machine, not only in a busy moment.
                warnings.warn(
                    f"The cached latency table {key}.json in {folder} "
                    f"failed its checks in {measured} measurements: "
                    + "; ".join(checked["problems"])
                    + ". Delete it to measure again.", stacklevel=2)
                return cached
            # Failed once: measure anew, keep the better of old and new.
            tries.append((cached.fields.get("fit_rms_ms", 0.0), cached,
                          checked["problems"]))
            if verbose:
                print(f"The cached latency table {key}.json failed its "
                      "checks when it was measured; measuring again.")
    start = time.perf_counter()
    plan = _Design(model, an, prunable, grid,
                   fields.get("channel_block", 8))
    served, served_an = _served(model, an, rt, plan.inner, measure)
    files = writers.Files(runtime, measure)
    try:
        files.prepare(served, served_an, plan.work, verbose)
        changes, fulls, slower = [], [], []
        for _ in range(attempts):
            change, full = sweep.measure(served, served_an, plan.work, (
                runtime, batch_size, threads, jit_compile, rounds, measure,
                files), verbose)
            measured += 1
            changes.append(change)
            fulls.append(full)
            fresh = [plan.checked(model, full, list(change * full), key,
                                  fields, max_error)]
            slower.append(quality.slower_widths(fresh[0][1], max_error))
            if len(fulls) > 1:  # the mean of this call's measurements
                full = float(np.median(fulls))
                fresh.append(plan.checked(
                    model, full, list(np.mean(changes, axis=0) * full), key,
                    fields, max_error, set.intersection(*slower)))
                fresh[-1][1].fields["measurements_averaged"] = len(fulls)
            tries += fresh
            if any(not wrong for _, _, wrong in fresh):
                break
    finally:
        files.close()
    _, table, wrong = min(tries, key=lambda t: (bool(t[2]), t[0]))
    table.cached = False  # measured again even when the old one stays
    table.fields["checks"] = {"clean": not wrong, "attempts": measured,
                              "problems": wrong}
    table.fields["profile_seconds"] = round(time.perf_counter() - start, 1)
    if wrong:
        warnings.warn(
            f"The latency table of {model.name!r} on {runtime} failed its "
            f"checks in {measured} measurements: " + "; ".join(wrong)
            + ". The machine may be busy; plans are verified by timing, "
            "but may need more iterations. table.fields['checks'] records "
            "this; a cached table that failed is measured again on its "
            "next use, once.",
            stacklevel=2,
        )
    if measure is None:
        tables.save(folder, table)
    return table
