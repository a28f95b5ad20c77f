"""Timing a slim model against the full one on a runtime, interleaved,
each from the file its runtime deploys (`kc.export`)."""

from __future__ import annotations

import os
import tempfile

from keras_csgd import checks
from keras_csgd.latency import timing
from keras_csgd.runtimes import get
from keras_csgd.runtimes.exporter import export

# Blocks of about 10 ms (at least the runtime's `verify_block_ms`) in as
# many rounds (9 to 101) as fit in 6 s.
VERIFY_TIMING = {"block_ms": 10.0, "budget_ms": 6000.0, "rounds": (9, 101)}


def verify_timing(runtime) -> dict:
    """`VERIFY_TIMING` with blocks of at least `runtime`'s
    `verify_block_ms`."""
    block_ms = max(VERIFY_TIMING["block_ms"], get(runtime).verify_block_ms)
    return {**VERIFY_TIMING, "block_ms": block_ms}


class Verifier:
    """Times slim variants against the full model, interleaved, by the
    runtime's protocol (`timing.Pair`). A context manager: leaving it ends
    the timing workers of runtimes that time in processes of their own.

    Args:
        model: the full model.
        runtime, batch_size, threads, jit_compile: the timed calls'.
        measure: a function `model -> ms` used instead, or `None`.
        folder: where the exported files go.
        full_ms: the full model's latency known beforehand (a latency
            table's `full`), or `None`. A timing whose full model runs
            more than `timing.SLOW_PHASE` times the fastest of it and the
            full model's earlier timings is taken again, up to
            `timing.RETIMES` times, and the one with the fastest full
            model is kept.
    """

    def __init__(self, model, runtime, batch_size, threads, jit_compile,
                 measure, folder, full_ms=None):
        self.model, self.measure, self.folder = model, measure, folder
        self.args = (runtime, batch_size, threads, jit_compile)
        self.pair, self.fastest = None, full_ms

    def _path(self, model, name):
        """`model`'s checked file (TensorFlow: none, it is served compiled
        in process)."""
        runtime = get(self.args[0])
        if not runtime.timed_from_file:
            return None
        return export(model, os.path.join(
            self.folder, f"{name}{runtime.suffix}"), runtime.format).path

    def __call__(self, variant, name) -> tuple[float, float, float]:
        """`(full_ms, slim_ms, ratio)`: block medians reduced by the
        runtime's statistic (the fastest, or TensorFlow's median; see
        `timing.block_ratio`)."""
        if self.measure is not None:
            full, ms = float(self.measure(self.model)), float(
                self.measure(variant))
            return full, ms, ms / full
        if self.pair is None:
            self.pair = timing.Pair(self.model, *self.args,
                                    **verify_timing(self.args[0]),
                                    path=self._path(self.model, "full"))
        path, best = self._path(variant, name), None
        for _ in range(1 + timing.RETIMES):
            stats = self.pair.against(variant, path)
            if best is None or stats["first_ms"] < best["first_ms"]:
                best = stats
            if self.fastest is None or (
                    best["first_ms"] <= timing.SLOW_PHASE * self.fastest):
                break
        self.fastest = min(best["first_ms"], self.fastest or best["first_ms"])
        return best["first_ms"], best["second_ms"], best["ratio"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pair is not None:
            self.pair.close()


def time_against_full(model, variant, runtime="litert", batch_size=1, *,
                      threads=None, jit_compile="auto"):
    """Times `variant` against `model`, interleaved, on `runtime`.

    Each model is written by `kc.export` for the runtime (checked against
    Keras) and its file loaded: in this process, or each in a process of
    its own for ONNX Runtime and OpenVINO (`Runtime.separate_process`, see
    `timing.Pair`); TensorFlow runs a compiled call of each model with
    BatchNormalization folded. Blocks of about 10 ms (TensorFlow: at
    least 50 ms, `Runtime.verify_block_ms`), in as many rounds (9 to 101)
    as fit 6 s (`VERIFY_TIMING`), alternating which model goes first;
    each model's latency is its fastest block median.

    Args:
        model: the full model.
        variant: its slim model (or any model of the same input).
        runtime: one of `kc.latency.RUNTIMES`. Defaults to `"litert"`.
        batch_size: batch size of the calls. Defaults to `1`.
        threads: the runtime's threads. Defaults to `None` (the usable
            cores).
        jit_compile: XLA for TensorFlow (`True`, `False` or `"auto"`: on
            a GPU only). Defaults to `"auto"`.

    Returns:
        `(full_ms, variant_ms, ratio)`: each model's fastest block median
        over the rounds (TensorFlow: its median block; see
        `timing.block_ratio`), and their ratio.

    Example:

    ```python
    small = kc.slim(model, plan)
    full_ms, slim_ms, ratio = kc.latency.time_against_full(model, small)
    ```
    """
    checks.choice("runtime", runtime, timing.RUNTIMES)
    checks.positive_int("batch_size", batch_size)
    threads = checks.positive_int("threads", threads, allow_none=True)
    threads = timing.cores() if threads is None else threads
    with tempfile.TemporaryDirectory() as folder, Verifier(
        model, runtime, batch_size, threads, jit_compile, None, folder
    ) as verifier:
        return verifier(variant, "variant")
