"""ONNX files (Keras's exporter, through tf2onnx) on ONNX Runtime's CPU
execution provider."""

from __future__ import annotations

import os

import numpy as np

from keras_csgd.runtimes.base import Program, Runtime

# ONNX Runtime's CPU kernels only reorder float32 arithmetic.
TOLERANCE = 1e-4


class OnnxRuntime(Runtime):
    """ONNX Runtime, CPU execution provider: `threads` intra-op threads,
    one inter-op thread, sequential execution, all graph optimizations.

    The intra-op threads do not spin between calls
    (`session.intra_op.allow_spinning = 0`): idle spinning pools of two
    sessions timed in turn in one process took each other's cores (on 2
    cores, a slim ResNet-56 measured 0.39 of the full model interleaved
    and 0.87 alone in its own process), and a deployed model shares its
    cores with the rest of the program too."""

    name = "onnxruntime"
    format = "onnx"
    suffix = ".onnx"
    packages = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
                ("tf2onnx", "tf2onnx"))
    extra = "onnx"
    keras_format = "onnx"

    def versions(self):
        # In the latency cache key: tables timed with spinning pools differ.
        return {**super().versions(), "intra_op_spinning": False}

    def load(self, path, threads=None, jit_compile="auto"):
        self.require()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.log_severity_level = 3
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            os.fspath(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def bind(x):
            feed = {name: np.asarray(x, np.float32)}
            return lambda: session.run(None, feed)

        return Program(lambda x: bind(x)()[0], bind,
                       session.get_inputs()[0].shape[1:], TOLERANCE)
