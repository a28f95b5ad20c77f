"""ONNX files (Keras's exporter, through tf2onnx) on ONNX Runtime's CPU
execution provider."""

from __future__ import annotations

import os
import warnings

import numpy as np

from keras_csgd.runtimes.base import Program, Runtime, traced

# ONNX Runtime's CPU kernels only reorder float32 arithmetic.
TOLERANCE = 1e-4


class OnnxRuntime(Runtime):
    """ONNX Runtime, CPU execution provider (see `session_options`).

    Latency timing loads each file in a process of its own
    (`separate_process`): two sessions timed in turn in one process ran
    differently from each alone, with pools that spin after a call (on 2
    cores, a slim ResNet-56 at 0.39 of the full model interleaved, 0.87
    alone) and without spinning (0.56 interleaved, 0.65 alone: the slim
    session ran at 0.96 ms beside the full one, 1.10 ms alone)."""

    name = "onnxruntime"
    format = "onnx"
    suffix = ".onnx"
    packages = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
                ("tf2onnx", "tf2onnx"))
    extra = "onnx"
    keras_format = "onnx"
    separate_process = True
    # MLAS's NCHWc convolutions block channels by 16 with AVX-512F and by 8
    # with AVX2; a convolution whose channels are not a multiple stays
    # outside the blocked layout, with reorders around it (a ResNet-56 stem
    # narrowed from 16 to 12 channels measured 13% slower).
    avx512_block = 16

    def versions(self):
        # In the latency cache key: tables timed with other spinning differ.
        return {**super().versions(), "spinning": "within calls"}

    def quick_write(self, model, path):
        # Keras's exporter converts the same traced function with tf2onnx
        # (its default opset), after an ExportArchive walk over every
        # variable: half of its time on a ResNet-56 variant (cProfile).
        self.require()
        import tf2onnx
        from keras.src.export.tf2onnx_lib import patch_tf2onnx

        function = traced(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            patch_tf2onnx()  # what Keras's exporter patches for NumPy 2
            tf2onnx.convert.from_function(
                function, function.input_signature,
                output_path=os.fspath(path))

    def load(self, path, threads=None, jit_compile="auto"):
        self.require()
        import onnxruntime as ort

        session = ort.InferenceSession(
            os.fspath(path), session_options(threads),
            providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def bind(x):
            feed = {name: np.asarray(x, np.float32)}
            return lambda: session.run(None, feed)

        return Program(lambda x: bind(x)()[0], bind,
                       session.get_inputs()[0].shape[1:], TOLERANCE)


def session_options(threads=None):
    """The `onnxruntime.SessionOptions` every session is made with.

    `threads` intra-op threads (`None`: ONNX Runtime's default, the
    physical cores), one inter-op thread and sequential execution, all
    graph optimizations, and thread pools that spin within a call, as by
    default, but stop when it returns (`session.force_spinning_stop`): a
    pool that goes on spinning holds its cores after a call, against the
    other work of the process and of the machine (a deployed model shares
    its cores with the rest of the program too, and the other model of a
    timed pair runs in a process beside it). Without spinning at all
    (`allow_spinning` at `"0"`, before) every operation woke its threads
    from sleep: a MobileNetV2 at 128x128 ran 1.88 ms instead of 1.29, and
    the ratio of the full model timed against itself in worker processes
    varied by 5.4% (standard deviation over 12 pairs) instead of 0.34%
    (`benchmarks/timing_noise.py`).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options
