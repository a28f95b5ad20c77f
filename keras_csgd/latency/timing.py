"""Runtimes and interleaved timing: what a latency is measured on.

A *runtime* (`keras_csgd.runtimes`) turns a Keras model into a
zero-argument call that runs one batch: `"litert"` (a float32 flatbuffer in
a LiteRT interpreter, with XNNPACK), `"litert-int8"` and the other LiteRT
quantizations, `"onnxruntime"`, `"openvino"` or `"tensorflow"` (a compiled
`tf.function` of the model with its BatchNormalization folded). Two calls
are timed *interleaved*: rounds alternate between them, each round times a
block of calls per model (its median), and each model's latency is its
fastest block median, the one other processes disturbed least (on
TensorFlow, whose calls vary by themselves, its median block:
`Runtime.block_statistic`). `Pair`
times variants against a full model this way, by the runtime's protocol:
in this process, or each model in a process of its own (`worker.Worker`)
for the runtimes with `Runtime.separate_process`.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import tensorflow as tf

import keras_csgd
from keras_csgd import runtimes
from keras_csgd.latency.worker import Worker
from keras_csgd.runtimes.base import uniform

RUNTIMES = tuple(runtimes.RUNTIMES)
# A timing whose full model runs more than SLOW_PHASE times its fastest
# known latency fell in a slow phase of the machine and is taken again, up
# to RETIMES times, keeping the one with the fastest full model
# (`kc.latency.profile`, `verify.Verifier`). On a quiet 2-core VM the whole
# machine had slow phases of 10 to 20 s, and they do not slow every model
# alike: ONNX Runtime's full MobileNetV2 at 128x128 ran 1.6x slower and its
# slim variants up to 2.1x, a ResNet-56 plan verified at 0.358 while its
# full model ran 1.55 ms (1.21 ms otherwise) re-timed 0.301 alone
# (`benchmarks/timing_noise.py`).
SLOW_PHASE = 1.15
RETIMES = 2
# /proc/cpuinfo flags that change which kernels a runtime picks.
SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
    "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2",
    "i8mm", "bf16",
)


def cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine() -> dict:
    """The CPU (model name, SIMD flags, cores) and accelerators.

    Returns:
        `{"cpu", "simd", "cores", "gpus"}`: the CPU model name from
        `/proc/cpuinfo` (else `platform.processor()`), the `SIMD_FLAGS` it
        lists, the usable cores and the names of TensorFlow's GPUs.
    """
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and value:
                    cpu = value.strip()
                elif key in ("flags", "Features"):
                    flags |= set(value.split())
    except OSError:
        pass
    gpus = [
        tf.config.experimental.get_device_details(d).get("device_name", d.name)
        for d in tf.config.list_physical_devices("GPU")
    ]
    return {
        "cpu": cpu,
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "cores": cores(),
        "gpus": gpus,
    }


def versions(runtime: str = "litert") -> dict:
    """Versions of the libraries a latency on `runtime` depends on: Keras,
    keras_csgd, and the runtime's own (`Runtime.versions`)."""
    import keras

    return {"keras": keras.__version__, "keras_csgd": keras_csgd.__version__,
            **runtimes.get(runtime).versions()}


def runner(model, runtime: str, batch_size: int, threads: int,
           jit_compile="auto", path=None):
    """A zero-argument call that runs `model` on one batch in `runtime`.

    Args:
        model: a single-input Keras model.
        runtime: one of `RUNTIMES`.
        batch_size: the batch size.
        threads: the runtime's threads (TensorFlow keeps its process-wide
            setting).
        jit_compile: compile the TensorFlow call with XLA: `True`,
            `False` or `"auto"` (XLA on a GPU only, see
            `keras_csgd.runtimes.tensorflow.xla`).
        path: a file `kc.export` wrote of `model` for `runtime`. Defaults
            to `None`: compiled here the quickest way (`Runtime.compile`:
            LiteRT converts without the SavedModel round trip).
    """
    rt = runtimes.get(runtime)
    program = (rt.compile(model, threads, jit_compile) if path is None
               else rt.load(path, threads, jit_compile))
    return program.bind(uniform((batch_size, *program.input_shape)))


def time_calls(fn, runs, warmup):
    """Wall-clock times of `runs` calls of `fn` after `warmup` untimed ones.

    Returns:
        `{"median_ms", "p10_ms", "p90_ms", "runs"}`.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return {
        "median_ms": float(median),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
        "runs": runs,
    }


def block_timer(timed):
    """`(calls, warmup) -> block median (ms)` of `timed`: a zero-argument
    call (timed here, `time_calls`) or a `worker.Worker` (timed in its
    process)."""
    if isinstance(timed, Worker):
        return timed.block
    return lambda calls, warmup: time_calls(timed, calls, warmup)[
        "median_ms"]


def schedule(call, block_ms: float, budget_ms: float,
             rounds: tuple[int, int]) -> tuple[int, int]:
    """`(calls per block, rounds)` for timing `call` against a peer.

    Blocks of about `block_ms` (1 to 200 calls); as many rounds as fit
    `budget_ms` for two blocks each, within `rounds = (least, most)`:
    short blocks in many rounds make the fastest block stable on a busy
    machine, at little cost for fast models. `call` is what `block_timer`
    takes.
    """
    ms = block_timer(call)(3, 2)
    calls = int(np.clip(round(block_ms / ms), 1, 200))
    least, most = rounds
    return calls, int(np.clip(round(budget_ms / (2 * calls * ms)), least,
                              most))


def interleaved(first, second, rounds: int, calls: int) -> tuple:
    """Block medians (ms) of two calls, timed in alternating rounds.

    Each round times a block of `calls` calls of each (after one untimed
    call that reloads the model's caches; none where a block is one call,
    which is long enough not to need it), `first` first in even rounds,
    `second` first in odd ones, so that slow phases of a shared machine hit
    both alike (see `fastest_blocks`). `first` and `second` are what
    `block_timer` takes.

    Returns:
        `(first_blocks, second_blocks)`: one block median per round each.
    """
    timers = (block_timer(first), block_timer(second))
    for timer in timers:
        timer(1, 0)
    blocks = ([], [])
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            blocks[k].append(timers[k](calls, int(calls > 1)))
    return np.array(blocks[0]), np.array(blocks[1])


def fastest_blocks(first_blocks, second_blocks) -> dict:
    """Each call's fastest block median over the rounds, and their ratio.

    Other processes only ever add time, so on a shared machine the fastest
    block is the least disturbed one; with many short blocks it is also
    stable (on a 2-core machine at load 4, identical models differed by
    0.03 to 0.1 ms of 1 ms this way, and by 0.2 to 1.1 ms in the median of
    the rounds' differences).

    Returns:
        `{"first_ms", "second_ms", "delta_ms" (second - first),
        "ratio" (second / first)}`.
    """
    return block_ratio(first_blocks, second_blocks, "fastest")


def block_ratio(first_blocks, second_blocks, statistic) -> dict:
    """`fastest_blocks` (`statistic="fastest"`), or the same from each
    call's median block (`"median"`): for a runtime whose calls vary by
    themselves (`Runtime.block_statistic`), where the fastest of many
    blocks is an extreme of that spread rather than the undisturbed
    time."""
    reduce = {"fastest": np.min, "median": np.median}[statistic]
    first = float(reduce(first_blocks))
    second = float(reduce(second_blocks))
    return {"first_ms": first, "second_ms": second,
            "delta_ms": second - first, "ratio": second / first}


class Pair:
    """Times variants against a full model, interleaved, by the runtime's
    protocol.

    In this process (LiteRT, TensorFlow), each model is a call here
    (`runner`: its file loaded, or, without one, the model compiled). For
    a runtime with `Runtime.separate_process` (ONNX Runtime, OpenVINO),
    the full model's file is loaded in one `worker.Worker` and each
    variant's, in turn, in a second one, and every block is timed in its
    worker. A context manager: leaving it (or `close`) ends the workers.

    Args:
        model: the full model.
        runtime, batch_size, threads, jit_compile: the timed calls' (see
            `runner`).
        block_ms, budget_ms, rounds: the schedule (see `schedule`).
        path: `model`'s file (`kc.export` or `Runtime.quick_write`), or
            `None` (not for `separate_process` runtimes).

    Example:

    ```python
    with Pair(model, "onnxruntime", 1, 2, False, 10.0, 6000.0,
              (9, 101), path="full.onnx") as pair:
        stats = pair.against(None, "slim.onnx")  # see `fastest_blocks`
    ```
    """

    def __init__(self, model, runtime, batch_size, threads, jit_compile,
                 block_ms, budget_ms, rounds, path=None):
        self.args = (runtime, batch_size, threads, jit_compile)
        self.runtime = runtimes.get(runtime)
        self.workers = {}
        if self.runtime.separate_process:
            # Both start now: their imports overlap with each other and
            # with the work before the first variant's load.
            self.workers = {slot: Worker(*self.args[:3])
                            for slot in ("full", "variant")}
        try:
            self.full = self.timed(model, path, "full")
            self.calls, self.rounds = schedule(self.full, block_ms,
                                               budget_ms, rounds)
        except BaseException:
            self.close()
            raise

    def timed(self, model, path=None, slot="variant"):
        """A model ready to time: a call, or the worker of `slot` with the
        file at `path` loaded."""
        if not self.runtime.separate_process:
            return runner(model, *self.args, path=path)
        if path is None:
            raise ValueError(
                f"`path` is required: {self.runtime.name} times files in "
                f"processes of their own. Received: path={path!r}"
            )
        self.workers[slot].load(path)
        return self.workers[slot]

    def against(self, variant, path=None) -> dict:
        """A variant timed against the full model: `block_ratio` of their
        interleaved rounds, by the runtime's `block_statistic`. `variant`
        is the model (`None` where `path`, its file, is given)."""
        return self.compare(self.timed(variant, path))

    def compare(self, timed) -> dict:
        """`against` for a variant already made ready by `timed`."""
        return block_ratio(*interleaved(self.full, timed, self.rounds,
                                        self.calls),
                           self.runtime.block_statistic)

    def close(self) -> None:
        """Ends the workers."""
        for worker in self.workers.values():
            worker.close()
        self.workers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
