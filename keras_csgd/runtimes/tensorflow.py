"""TensorFlow: a compiled call of the model with BatchNormalization folded,
in process (profiling), or its SavedModel (Keras's exporter) loaded."""

from __future__ import annotations

import functools
import os
import warnings

import tensorflow as tf

from keras_csgd.fold import fold_batchnorm, folds_any
from keras_csgd.runtimes.base import Program, Runtime, input_spec

# Folding BatchNormalization only reorders float32 arithmetic.
TOLERANCE = 1e-4


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


def set_tf_threads(threads):
    """Pins TensorFlow's intra-op threads; warns once TF has started."""
    current = tf.config.threading.get_intra_op_parallelism_threads()
    if current == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        warnings.warn(
            f"TensorFlow is already initialised with {current or 'all'} "
            f"intra-op threads; `threads={threads}` applies only to the "
            "other runtimes. Set threads before running any TensorFlow op "
            "to pin Keras threads too.",
            stacklevel=2,
        )


def _program(function, shape, jit_compile) -> Program:
    call = tf.function(function, jit_compile=xla(jit_compile))

    def bind(x):
        x = tf.constant(x, tf.float32)
        return lambda: call(x).numpy()

    return Program(lambda x: bind(x)(), bind, shape, TOLERANCE)


class TensorFlow(Runtime):
    """TensorFlow on the device it places the model on; intra-op threads
    are TensorFlow's process-wide setting (`set_tf_threads`)."""

    name = "tensorflow"
    format = "saved_model"
    keras_format = "tf_saved_model"
    timed_from_file = False  # served as a compiled call in process
    # A TensorFlow call's time varies by itself (its executor's threads),
    # not only when other processes run: timed against an identical copy
    # of itself, a ResNet-56 at batch 1 measures a ratio off 1 by 6.4%
    # (standard deviation) with the fastest blocks, 2.1% with the block
    # medians (2.5% and 1.4% at batch 64; `benchmarks/identical_pairs.py`).
    block_statistic = "median"
    # Twice LiteRT's call noise (2.1% and 1.1% per pair at batch 1, the
    # standard deviation of 18 ratios of a ResNet-56 timed against a copy
    # of itself, `benchmarks/identical_pairs.py`), so twice the 3% a
    # table's checks allow: at 3%, 2 of 4 ResNet-56 tables on a quiet
    # machine failed, each on one width 3.3 or 3.5% slower than a wider one.
    profile_error = 0.06
    # A call right after another model's runs slower than the next ones,
    # the smaller model's relatively more, so verification times blocks of
    # at least 50 ms (after an untimed call), as each model runs alone in a
    # process of its own: `benchmarks/tf_blocks.py`. (Profiles keep short
    # blocks: with 50 ms ones a ResNet-56 profile took 145 s, over its 2
    # minutes, and predicted no better.)
    verify_block_ms = 50.0

    def versions(self):
        return {"tensorflow": tf.__version__}

    def write(self, model, path, data=None, sparse=False):
        super().write(fold_batchnorm(model), path)

    def load(self, path, threads=None, jit_compile="auto"):
        loaded = tf.saved_model.load(os.fspath(path))
        serve = loaded.signatures["serving_default"]
        name, spec = next(iter(serve.structured_input_signature[1].items()))
        output = next(iter(serve.structured_outputs))

        def function(x):  # keeps `loaded`, which owns the variables
            return loaded.signatures["serving_default"](**{name: x})[output]

        return _program(function, spec.shape[1:], jit_compile)

    def served(self, model):
        """`model` with BatchNormalization folded (`kc.fold_batchnorm`), or
        `model` itself where no normalization folds (a folded model: the
        clone costs about as much as the slim surgery). Slimming a folded
        ResNet-56 takes a third of the time of slimming and folding the
        model, most of a profile variant's build."""
        return fold_batchnorm(model) if folds_any(model) else model

    def compile(self, model, threads=None, jit_compile="auto"):
        folded = self.served(model)
        return _program(functools.partial(folded, training=False),
                        input_spec(model).shape[1:], jit_compile)
