"""Runtimes and interleaved timing: what a latency is measured on.

A *runtime* turns a Keras model into a zero-argument call that runs one
batch: `"litert"` (the float32 flatbuffer in a LiteRT interpreter, with
XNNPACK) or `"tensorflow"` (a compiled `tf.function` of the model with its
BatchNormalization folded, on the device TensorFlow places it on). Two calls
are timed *interleaved*: rounds alternate between them, each round times a
block of calls per model (its median), and each model's latency is its
fastest block median, the one other processes disturbed least.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform

import numpy as np
import tensorflow as tf

import keras_csgd
from keras_csgd import export
from keras_csgd.fold import fold_batchnorm

RUNTIMES = ("litert", "tensorflow")
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


def versions() -> dict:
    """Versions of the libraries a latency depends on."""
    import keras

    try:
        litert = importlib.metadata.version("ai-edge-litert")
    except importlib.metadata.PackageNotFoundError:
        litert = None
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "ai_edge_litert": litert,
        "keras_csgd": keras_csgd.__version__,
    }


def inputs(model, batch_size: int) -> np.ndarray:
    """A fixed uniform random batch for `model`'s input."""
    shape = export.input_spec(model).shape[1:]
    rng = np.random.default_rng(0)
    return rng.uniform(size=(batch_size, *shape)).astype(np.float32)


def xla(jit_compile) -> bool:
    """Whether the TensorFlow runtime compiles with XLA.

    `"auto"` means XLA where TensorFlow has a GPU, TensorFlow's graph
    kernels on a CPU: XLA's CPU convolutions are slower than TensorFlow's
    oneDNN kernels (`benchmarks/xla_cpu.py` on a 2-core AVX-512 Xeon at
    batch 64: 1.85x for a CIFAR ResNet-56, 22.6x for MobileNetV2 at
    128x128, whose depthwise convolutions XLA's CPU backend runs slowly).
    """
    if jit_compile == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    if not isinstance(jit_compile, bool):
        raise ValueError(
            "`jit_compile` must be True, False or 'auto'. "
            f"Received: jit_compile={jit_compile!r}"
        )
    return jit_compile


def runner(model, runtime: str, batch_size: int, threads: int,
           jit_compile="auto", tflite=None):
    """A zero-argument call that runs `model` on one batch in `runtime`.

    Args:
        model: a single-input Keras model.
        runtime: `"litert"` or `"tensorflow"`.
        batch_size: the batch size.
        threads: LiteRT interpreter threads.
        jit_compile: compile the TensorFlow call with XLA: `True`,
            `False` or `"auto"` (XLA on a GPU only, see `xla`).
        tflite: for `"litert"`, the flatbuffer bytes or a `.tflite` path.
            Defaults to `None` (converted here, without the SavedModel
            round trip: `export.tflite_flatbuffer(model, saved_model=False)`).
    """
    x = inputs(model, batch_size)
    if runtime == "litert":
        interpreter = export.load_interpreter(
            tflite if tflite is not None
            else export.tflite_flatbuffer(model, saved_model=False),
            threads,
        )
        export.set_input(interpreter, x)
        return interpreter.invoke
    call = tf.function(
        functools.partial(fold_batchnorm(model), training=False),
        jit_compile=xla(jit_compile),
    )
    x = tf.constant(x)
    return lambda: call(x).numpy()


def schedule(call, block_ms: float, budget_ms: float,
             rounds: tuple[int, int]) -> tuple[int, int]:
    """`(calls per block, rounds)` for timing `call` against a peer.

    Blocks of about `block_ms` (1 to 200 calls); as many rounds as fit
    `budget_ms` for two blocks each, within `rounds = (least, most)`:
    short blocks in many rounds make the fastest block stable on a busy
    machine, at little cost for fast models.
    """
    ms = export.time_calls(call, runs=3, warmup=2)["median_ms"]
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
                export.time_calls(call, runs=calls,
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
