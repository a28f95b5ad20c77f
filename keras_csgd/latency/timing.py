"""Runtimes and interleaved timing: what a latency is measured on.

A *runtime* (`keras_csgd.runtimes`) turns a Keras model into a
zero-argument call that runs one batch: `"litert"` (a float32 flatbuffer in
a LiteRT interpreter, with XNNPACK), `"litert-int8"` and the other LiteRT
quantizations, `"onnxruntime"`, `"openvino"` or `"tensorflow"` (a compiled
`tf.function` of the model with its BatchNormalization folded). Two calls
are timed *interleaved*: rounds alternate between them, each round times a
block of calls per model (its median), and each model's latency is its
fastest block median, the one other processes disturbed least.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import tensorflow as tf

import keras_csgd
from keras_csgd import runtimes
from keras_csgd.runtimes.base import random_inputs

RUNTIMES = tuple(runtimes.RUNTIMES)
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
    return program.bind(random_inputs(model, batch_size))


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


def schedule(call, block_ms: float, budget_ms: float,
             rounds: tuple[int, int]) -> tuple[int, int]:
    """`(calls per block, rounds)` for timing `call` against a peer.

    Blocks of about `block_ms` (1 to 200 calls); as many rounds as fit
    `budget_ms` for two blocks each, within `rounds = (least, most)`:
    short blocks in many rounds make the fastest block stable on a busy
    machine, at little cost for fast models.
    """
    ms = time_calls(call, runs=3, warmup=2)["median_ms"]
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
    both alike (see `fastest_blocks`).

    Returns:
        `(first_blocks, second_blocks)`: one block median per round each.
    """
    first()
    second()
    blocks = ([], [])
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            call = (first, second)[k]
            blocks[k].append(
                time_calls(call, runs=calls,
                                warmup=int(calls > 1))["median_ms"]
            )
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
    first, second = float(np.min(first_blocks)), float(np.min(second_blocks))
    return {"first_ms": first, "second_ms": second,
            "delta_ms": second - first, "ratio": second / first}
