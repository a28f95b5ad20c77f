"""`export`: a checked file for any runtime, written atomically.

`export_tflite` (the LiteRT-only entry point) is a thin call of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import NamedTuple

from keras_csgd import batches
from keras_csgd.runtimes import for_format
from keras_csgd.runtimes.base import check_outputs, input_spec
from keras_csgd.runtimes.litert import CALIBRATION_SAMPLES, check_quantize


class ExportResult(NamedTuple):
    """What `export` wrote.

    Attributes:
        path: the file (the `.xml` for OpenVINO, the folder of a
            SavedModel).
        size_bytes: its size (with the OpenVINO `.bin`; the folder's
            files for a SavedModel).
        max_error: `max |file - Keras| / max(1, max |Keras|)` on the check
            inputs, or `None` when `check=False`.
        tolerance: the largest `max_error` the check allows, or `None`
            when `check=False`.
    """

    path: str
    size_bytes: int
    max_error: float | None
    tolerance: float | None = None


def _size(paths) -> int:
    total = 0
    for path in paths:
        if os.path.isdir(path):
            total += sum(os.path.getsize(os.path.join(root, f))
                         for root, _, files in os.walk(path) for f in files)
        else:
            total += os.path.getsize(path)
    return total


def _place(runtime, written, path) -> None:
    """Moves the written file(s) onto `path` (same file system)."""
    for source, target in zip(runtime.files(written), runtime.files(path)):
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(source, target)


def export(model, path, format="litert", *, data=None, check=True,
           sparse=False) -> ExportResult:
    """Writes `model` for a runtime and checks it against Keras.

    Every format is written by Keras's own `model.export` (LiteRT with
    builtin ops only and the quantization's converter settings, see
    `keras_csgd.runtimes.litert`; ONNX through tf2onnx; OpenVINO IR;
    a SavedModel of the model with BatchNormalization folded), into a
    temporary folder next to `path`, run by its runtime on check inputs and
    compared with Keras, then moved into place: on any failure no file (and
    no partial file) is left at `path`.

    Formats, their runtimes and the largest allowed relative error
    `max |file - Keras| / max(1, max |Keras|)`:

    | format | runtime | tolerance |
    |---|---|---|
    | `"litert"` | LiteRT, float32 | 1e-4 |
    | `"litert-float16"` | LiteRT, float16 weights | 5e-3 |
    | `"litert-dynamic"` | LiteRT, int8 weights | 0.05 |
    | `"litert-int8"` | LiteRT, full-integer int8, float32 interface | 0.25 |
    | `"onnx"` | ONNX Runtime, CPU | 1e-4 |
    | `"openvino"` | OpenVINO CPU plugin | 1e-4 (float32), 0.05 (bf16) |
    | `"saved_model"` | TensorFlow | 1e-4 |

    Args:
        model: a built single-input Keras model.
        path: the output file (`.tflite`, `.onnx`, `.xml` with its `.bin`
            beside it) or, for `"saved_model"`, folder; its folder must
            exist.
        format: one of the formats above. Defaults to `"litert"`.
        data: inputs: a NumPy array `(N, ...)`, an iterable of batches `x`
            or `(x, y)` (e.g. a `tf.data.Dataset`), or any other form
            `keras_csgd.batches` reads (an `.npz`, an image folder). Its
            first 100 samples calibrate `"litert-int8"` ranges and its first
            8 are the check inputs. Defaults to `None`: uniform `[0, 1)`
            inputs for both.
        check: compare the file's outputs with the model's and raise when
            the error exceeds the tolerance. Defaults to `True`.
        sparse: LiteRT only: store sparse kernels in a compressed
            (block-sparse) format, for models pruned with `kc.GSM` +
            `kc.sparsify`. Defaults to `False`.

    Returns:
        An `ExportResult(path, size_bytes, max_error, tolerance)`.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: an unknown `format`, a model without exactly one input,
            a missing output folder, a `path` without the format's suffix,
            `sparse` for a format other than LiteRT, `data` without a
            sample.
        ImportError: the format's runtime package is missing (the message
            names it and the keras_csgd extra that installs it).
        RuntimeError: if the check fails (nothing is written then).

    Example:

    ```python
    kc.export(slim, "slim.tflite", format="litert-int8", data=x_train)
    kc.export(slim, "slim.onnx", format="onnx").max_error
    ```
    """
    runtime = for_format(format)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(
            f"`path` must be in an existing folder. Received: path={path!r}"
        )
    if runtime.suffix and not path.endswith(runtime.suffix):
        raise ValueError(
            f"`path` must end with {runtime.suffix!r} for "
            f"format={format!r}. Received: path={path!r}"
        )
    if sparse and not runtime.format.startswith("litert"):
        raise ValueError(
            "`sparse` applies to the LiteRT formats only. "
            f"Received: sparse={sparse!r} with format={format!r}"
        )
    input_spec(model)
    runtime.require()
    samples = None
    if data is not None:
        samples = batches.fixed_arrays(data, CALIBRATION_SAMPLES, "data")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp:
        written = os.path.join(tmp, f"model{runtime.suffix}")
        runtime.write(model, written, samples, sparse)
        max_error = tolerance = None
        if check:
            max_error, tolerance = check_outputs(model, runtime, written,
                                                 samples)
        _place(runtime, written, path)
    return ExportResult(path, _size(runtime.files(path)), max_error,
                        tolerance)


def export_tflite(model, path, quantize=None, representative_data=None,
                  check=True, sparse=False) -> ExportResult:
    """Writes `model` as a LiteRT (TFLite) flatbuffer and checks it.

    `export(model, path, format)` with `format` `"litert"` (`quantize=None`)
    or `"litert-<quantize>"`.

    Args:
        model: a built single-input Keras model.
        path: output `.tflite` file; its folder must exist.
        quantize: `None` (float32), `"dynamic"` (int8 weights, float
            activations), `"float16"` (float16 weights) or `"int8"` (full
            integer kernels with a float32 interface; needs
            `representative_data`). Defaults to `None`.
        representative_data: inputs (see `export`'s `data`); calibrates
            int8 ranges and gives the check inputs. Defaults to `None`.
        check: compare with Keras (see `export`). Defaults to `True`.
        sparse: compressed sparse kernels (see `export`). Defaults to
            `False`.

    Returns:
        An `ExportResult(path, size_bytes, max_error, tolerance)`.

    Raises:
        TypeError, ValueError, RuntimeError: as `export`; also a
            `ValueError` for an unknown `quantize` or `"int8"` without
            `representative_data`.

    Example:

    ```python
    result = kc.export_tflite(slim_model, "slim.tflite")
    print(result.size_bytes, result.max_error)
    ```
    """
    check_quantize(quantize)
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            '`representative_data` is required for quantize="int8" (it '
            "calibrates activation ranges). Received: representative_data=None"
        )
    return export(model, path, "litert" + (f"-{quantize}" if quantize else ""),
                  data=representative_data, check=check, sparse=sparse)
