"""Runtimes: what a model is exported to and timed on.

One module per runtime, each a `Runtime` (see `base`): `litert` (float32,
float16 weights, dynamic-range and full-integer int8 flatbuffers in a LiteRT
interpreter), `onnx` (ONNX Runtime, CPU execution provider), `openvino`
(OpenVINO's CPU plugin) and `tensorflow` (a compiled call in process, or a
SavedModel). `get(name)` finds one by runtime name, `for_format(name)` by
export format name.
"""

from keras_csgd import checks
from keras_csgd.runtimes.base import Program, Runtime, input_spec
from keras_csgd.runtimes.litert import LiteRT
from keras_csgd.runtimes.onnx import OnnxRuntime
from keras_csgd.runtimes.openvino import OpenVINO
from keras_csgd.runtimes.tensorflow import TensorFlow

_ALL = (LiteRT(), LiteRT("float16"), LiteRT("dynamic"), LiteRT("int8"),
        OnnxRuntime(), OpenVINO(), TensorFlow())
RUNTIMES = {r.name: r for r in _ALL}
FORMATS = {r.format: r for r in _ALL}


def get(name: str) -> Runtime:
    """The runtime called `name` (one of `RUNTIMES`).

    Raises:
        ValueError: an unknown name.
    """
    return RUNTIMES[checks.choice("runtime", name, tuple(RUNTIMES))]


def for_format(name: str) -> Runtime:
    """The runtime of the export format `name` (one of `FORMATS`).

    Raises:
        ValueError: an unknown name.
    """
    return FORMATS[checks.choice("format", name, tuple(FORMATS))]


__all__ = ["FORMATS", "RUNTIMES", "LiteRT", "OnnxRuntime", "OpenVINO",
           "Program", "Runtime", "TensorFlow", "for_format", "get",
           "input_spec"]
