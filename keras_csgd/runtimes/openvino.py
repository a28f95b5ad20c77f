"""OpenVINO IR files (Keras's exporter) on OpenVINO's CPU plugin."""

from __future__ import annotations

import os

import numpy as np

from keras_csgd.runtimes.base import Program, Runtime, traced

# By the CPU plugin's inference precision: float32 kernels only reorder
# arithmetic; bfloat16 (the plugin's default on CPUs with AVX512_BF16 or
# AMX) keeps 8 significant bits of every activation.
TOLERANCES = {"f32": 1e-4, "bf16": 0.05, "f16": 0.01}


class OpenVINO(Runtime):
    """OpenVINO's CPU plugin at its default inference precision, with the
    properties of `cpu_config`.

    Latency timing loads each file in a process of its own
    (`separate_process`), as for ONNX Runtime: in one process two compiled
    models share the plugin's thread pools; alone in a process, each runs
    as it is deployed."""

    name = format = "openvino"
    suffix = ".xml"
    packages = (("openvino", "openvino"),)
    extra = "openvino"
    keras_format = "openvino"
    separate_process = True
    # oneDNN's blocked layouts: nChw16c with AVX-512, nChw8c with AVX2.
    avx512_block = 16

    def files(self, path):
        return [path, os.path.splitext(path)[0] + ".bin"]

    def versions(self):
        out = super().versions()
        if out["openvino"] is not None:
            out["precision"] = _precision(_core())
            out["cpu_pinning"] = False
        return out

    def quick_write(self, model, path):
        # Keras's exporter converts the same traced function, after an
        # ExportArchive walk over every variable: half of its time on a
        # ResNet-56 variant (cProfile). `ov.serialize` keeps float32
        # weights, as Keras's exporter does.
        self.require()
        import openvino as ov

        ov.serialize(ov.convert_model(traced(model).get_concrete_function()),
                     os.fspath(path))

    def load(self, path, threads=None, jit_compile="auto"):
        self.require()
        compiled = _core().compile_model(os.fspath(path), "CPU",
                                         cpu_config(threads))
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


def cpu_config(threads=None) -> dict:
    """The CPU plugin's properties every model is compiled with.

    The latency hint with one stream (one request at a time, all its
    threads on it), `threads` inference threads (`None`: the plugin's
    default, the cores) and threads not pinned to cores
    (`ENABLE_CPU_PINNING`, on by default on Linux): a pinned thread cannot
    leave a core that other work holds, which can keep a whole process
    slow on a shared machine (pinned, the same slim ResNet-56 file's
    fastest block was 0.45 ms in one process and 0.67 ms in the next); no
    cores are reserved (`ENABLE_CPU_RESERVATION`).
    """
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              "ENABLE_CPU_PINNING": False, "ENABLE_CPU_RESERVATION": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


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
