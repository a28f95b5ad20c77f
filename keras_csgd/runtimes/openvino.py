"""OpenVINO IR files (Keras's exporter) on OpenVINO's CPU plugin."""

from __future__ import annotations

import os

import numpy as np

from keras_csgd.runtimes.base import Program, Runtime

# By the CPU plugin's inference precision: float32 kernels only reorder
# arithmetic; bfloat16 (the plugin's default on CPUs with AVX512_BF16 or
# AMX) keeps 8 significant bits of every activation.
TOLERANCES = {"f32": 1e-4, "bf16": 0.05, "f16": 0.01}


class OpenVINO(Runtime):
    """OpenVINO's CPU plugin at its default inference precision, latency
    hint, one stream, `threads` inference threads."""

    name = format = "openvino"
    suffix = ".xml"
    packages = (("openvino", "openvino"),)
    extra = "openvino"
    keras_format = "openvino"

    def files(self, path):
        return [path, os.path.splitext(path)[0] + ".bin"]

    def versions(self):
        out = super().versions()
        if out["openvino"] is not None:
            out["precision"] = _precision(_core())
        return out

    def load(self, path, threads=None, jit_compile="auto"):
        self.require()
        core = _core()
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(os.fspath(path), "CPU", config)
        request = compiled.create_infer_request()

        def bind(x):
            request.set_input_tensor(_tensor(x))
            return request.infer

        def run(x):
            bind(x)()
            return request.get_output_tensor(0).data.copy()

        shape = compiled.inputs[0].get_partial_shape()
        precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        return Program(run, bind, [d.get_length() for d in shape[1:]],
                       TOLERANCES.get(_short(precision), TOLERANCES["bf16"]))


def _core():
    import openvino as ov

    return ov.Core()


def _tensor(x):
    import openvino as ov

    return ov.Tensor(np.ascontiguousarray(x, np.float32))


def _short(precision: str) -> str:
    """`"<Type: 'bfloat16'>"` -> `"bf16"`, `"f32"` -> `"f32"`."""
    for long, short in (("bfloat16", "bf16"), ("float32", "f32"),
                        ("float16", "f16")):
        if long in precision:
            return short
    return precision


def _precision(core) -> str:
    return _short(str(core.get_property("CPU", "INFERENCE_PRECISION_HINT")))
