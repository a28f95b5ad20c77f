"""LiteRT (TFLite): float32, float16 weights, dynamic-range and int8 files.

Files are written by Keras's own exporter (`model.export(path,
format="litert")`: an `ExportArchive` SavedModel converted by
`tf.lite.TFLiteConverter`), with converter settings that Keras passes
through: builtin ops only (Keras adds the Flex delegate's TensorFlow ops by
default; no Flex delegate is needed here), the quantization (`"float16"`
weights; `"dynamic"` int8 weights; `"int8"` full-integer kernels with a
float32 interface, calibrated on a representative dataset) and the
compressed storage of sparse kernels. Keras's exporter always converts
through a SavedModel, about 9 s for a ResNet-56; profiling converts dozens
of variants, so `Runtime.compile` converts the traced function directly
(`tflite_flatbuffer(saved_model=False)`: the same graph, about 2 s).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import tempfile
import warnings

import numpy as np
import tensorflow as tf

from keras_csgd import batches
from keras_csgd.runtimes.base import (
    Program,
    Runtime,
    input_spec,
    random_inputs,
    traced,
)
from keras_csgd.runtimes.quiet import silenced_stderr

QUANTIZE_MODES = (None, "dynamic", "float16", "int8")

# Largest allowed |LiteRT - Keras| / max(1, max |Keras|) per quantize mode.
# Float conversion only reorders float32 arithmetic; float16 rounds weights
# to 11 significant bits; "dynamic" quantizes weights (and, on the fly,
# activations) to int8; "int8" quantizes every tensor with ranges calibrated
# on the representative data. The int8 bounds hold for inputs drawn like the
# calibration data (tests/test_export.py checks them on trained models).
TOLERANCES = {None: 1e-4, "float16": 5e-3, "dynamic": 0.05, "int8": 0.25}

CALIBRATION_SAMPLES = 100
# Profiling only needs the int8 graph's shape, not good ranges.
QUICK_CALIBRATION_SAMPLES = 4


def check_quantize(quantize) -> None:
    """`ValueError` unless `quantize` is one of `QUANTIZE_MODES`."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"`quantize` must be one of {QUANTIZE_MODES}. "
            f"Received: quantize={quantize!r}"
        )


def converter_options(quantize, calibration=None, sparse=False) -> dict:
    """`tf.lite.TFLiteConverter` settings, as Keras's exporter takes them.

    Args:
        quantize: one of `QUANTIZE_MODES`.
        calibration: `"int8"` calibration inputs `(N, ...)`.
        sparse: store sparse kernels compressed.
    """
    ops = tf.lite.OpsSet
    options = {
        "target_spec": {"supported_ops": [
            ops.TFLITE_BUILTINS_INT8 if quantize == "int8"
            else ops.TFLITE_BUILTINS
        ]},
        "optimizations": [tf.lite.Optimize.DEFAULT] if quantize else [],
    }
    if sparse:
        options["optimizations"].append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    if quantize == "float16":
        options["target_spec"]["supported_types"] = [tf.float16]
    if quantize == "int8":
        options["representative_dataset"] = lambda: (
            [sample[None].astype(np.float32)] for sample in calibration
        )
    return options


def _configure(converter, options):
    for key, value in options.items():
        if key == "target_spec":
            for spec_key, spec_value in value.items():
                setattr(converter.target_spec, spec_key, spec_value)
        else:
            setattr(converter, key, value)


@contextlib.contextmanager
def _quiet_converter():
    """absl at errors only (the direct path's deprecation note), and no
    warning that int8 inputs have no statistics (they stay float32)."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Statistics for quantized")
            yield
    finally:
        absl.setLevel(level)


def _options(model, quantize, representative_data, sparse) -> dict:
    check_quantize(quantize)
    input_spec(model)
    calibration = None
    if quantize == "int8":
        calibration = (
            random_inputs(model, CALIBRATION_SAMPLES)
            if representative_data is None else batches.fixed_arrays(
                representative_data, CALIBRATION_SAMPLES,
                "representative_data")
        )
    return converter_options(quantize, calibration, sparse)


def write_tflite(model, path, quantize=None, representative_data=None,
                 sparse=False) -> None:
    """Writes `model` to the `.tflite` file `path` with Keras's exporter.

    Args:
        model: a built single-input Keras model.
        path: the `.tflite` file.
        quantize: one of `QUANTIZE_MODES`. Defaults to `None` (float32).
        representative_data: inputs that calibrate `"int8"` ranges, in any
            form `keras_csgd.batches` reads (first 100 samples). Defaults
            to `None`: uniform `[0, 1)` inputs.
        sparse: store sparse kernels compressed. Defaults to `False`.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: on an unknown `quantize` or a model without exactly one
            input.
    """
    options = _options(model, quantize, representative_data, sparse)
    with _quiet_converter():
        model.export(os.fspath(path), format="litert", verbose=False,
                     input_signature=[input_spec(model)], **options)


def tflite_flatbuffer(model, quantize=None, representative_data=None,
                      sparse=False, *, saved_model=True) -> bytes:
    """Converts `model` to a LiteRT flatbuffer, in memory.

    Args:
        model, quantize, representative_data, sparse: as `write_tflite`.
        saved_model: convert with Keras's exporter (through a SavedModel,
            `write_tflite`); `False` converts the traced function directly,
            the same graph without the SavedModel round trip (profiling's
            fast path). Defaults to `True`.

    Returns:
        The flatbuffer bytes.

    Raises:
        TypeError, ValueError: as `write_tflite`.
    """
    if saved_model:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.tflite")
            write_tflite(model, path, quantize, representative_data, sparse)
            with open(path, "rb") as f:
                return f.read()
    options = _options(model, quantize, representative_data, sparse)
    with _quiet_converter():
        function = traced(model).get_concrete_function()
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [function])
        converter.experimental_lower_to_saved_model = False
        _configure(converter, options)
        return converter.convert()


def load_interpreter(path_or_bytes, threads=None):
    """A LiteRT interpreter with its tensors allocated.

    Args:
        path_or_bytes: a `.tflite` path or the flatbuffer bytes.
        threads: interpreter threads. Defaults to `None` (LiteRT default).

    Returns:
        An `ai_edge_litert` interpreter when that package is installed,
        else TensorFlow's `tf.lite.Interpreter`.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    source = (
        {"model_content": path_or_bytes} if isinstance(path_or_bytes, bytes)
        else {"model_path": str(path_or_bytes)}
    )
    # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate" on
    # the C++ stderr whenever an interpreter is made.
    with silenced_stderr():
        interpreter = Interpreter(**source, num_threads=threads)
        interpreter.allocate_tensors()
    return interpreter


def set_input(interpreter, x):
    """Resizes a single-input interpreter's input to `x.shape`, feeds `x`."""
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x.astype(detail["dtype"]))


def run_tflite(path_or_bytes, x, threads=None):
    """Runs a single-input `.tflite` model on the batch `x`.

    Returns:
        The first output as a NumPy array.
    """
    return _program(load_interpreter(path_or_bytes, threads), None).run(x)


def _program(interpreter, tolerance) -> Program:
    output = interpreter.get_output_details()[0]["index"]

    def bind(x):
        set_input(interpreter, np.asarray(x))
        return interpreter.invoke

    def run(x):
        bind(x)()
        return interpreter.get_tensor(output)

    shape = interpreter.get_input_details()[0]["shape"][1:]
    return Program(run, bind, shape, tolerance)


class LiteRT(Runtime):
    """A LiteRT interpreter (XNNPACK) on a flatbuffer of one quantization.

    Args:
        quantize: one of `QUANTIZE_MODES`.
    """

    suffix = ".tflite"

    def __init__(self, quantize=None):
        check_quantize(quantize)
        self.quantize = quantize
        self.name = self.format = "litert" + (
            f"-{quantize}" if quantize else "")

    def versions(self) -> dict:
        try:
            version = importlib.metadata.version("ai-edge-litert")
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"ai-edge-litert": version, "tensorflow": tf.__version__}

    def write(self, model, path, data=None, sparse=False):
        write_tflite(model, path, self.quantize, data, sparse)

    def load(self, path, threads=None, jit_compile="auto"):
        return _program(load_interpreter(path, threads),
                        TOLERANCES[self.quantize])

    def _quick(self, model) -> bytes:
        """The flatbuffer converted from the traced function (int8:
        calibrated on a few uniform inputs)."""
        data = (random_inputs(model, QUICK_CALIBRATION_SAMPLES)
                if self.quantize == "int8" else None)
        return tflite_flatbuffer(model, self.quantize, data,
                                 saved_model=False)

    def quick_write(self, model, path):
        with open(path, "wb") as f:
            f.write(self._quick(model))

    def compile(self, model, threads=None, jit_compile="auto"):
        return _program(load_interpreter(self._quick(model), threads),
                        TOLERANCES[self.quantize])
