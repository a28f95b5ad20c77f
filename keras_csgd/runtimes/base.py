"""The runtime interface: a Keras model in, a file and a timed call out.

A `Runtime` writes a model to its file format (with Keras's own
`model.export` where it serves), loads a file into a `Program`, and
compiles a model straight into a `Program` for latency profiling (the
quickest way the runtime allows; `quick_write` writes that quickest file).
`separate_process` says whether latency timing loads the runtime's files
in processes of their own (`keras_csgd.latency.worker`). A `Program` runs
a batch (`run`) or binds one to a zero-argument call that is timed
(`bind`). `check_outputs` compares a written file with Keras within the
runtime's stated tolerance.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

CHECK_SAMPLES = 8


def input_spec(model) -> tf.TensorSpec:
    """The `tf.TensorSpec` of a single-input model, with a free batch size.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: if it is not built or has more than one input.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r}"
        )
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs or len(inputs) != 1:
        raise ValueError(
            "`model` must be a built Keras model with exactly one input "
            "(a functional or Sequential model with an `Input`). "
            f"Received: model={model!r}"
        )
    return tf.TensorSpec((None,) + tuple(inputs[0].shape[1:]), inputs[0].dtype)


def traced(model):
    """`model`'s inference call (`training=False`) as a `tf.function` of
    its `input_spec` (`.get_concrete_function()` traces it): the graph
    Keras's exporters convert, without their `ExportArchive`, whose walk
    over every tracked variable took as long as the conversion itself for
    a ResNet-56."""
    call = functools.partial(model.__call__, training=False)
    return tf.function(call, input_signature=[input_spec(model)])


def uniform(shape, seed: int = 0) -> np.ndarray:
    """Uniform `[0, 1)` float32 inputs of `shape`: the range of the images
    `keras_csgd.batches` reads."""
    rng = np.random.default_rng(seed)
    return rng.uniform(size=tuple(shape)).astype(np.float32)


def random_inputs(model, samples: int, seed: int = 0) -> np.ndarray:
    """`samples` uniform `[0, 1)` inputs for `model` (see `uniform`)."""
    return uniform((samples, *input_spec(model).shape[1:]), seed)


class Program:
    """A model loaded into a runtime.

    Args:
        run: `x -> first output` (NumPy).
        bind: `x -> zero-argument call` that runs the batch `x`; the call
            is what latency timing measures.
        input_shape: one sample's shape, without the batch dimension.
        tolerance: largest `max |output - Keras| / max(1, max |Keras|)`
            this program is checked against.
    """

    def __init__(self, run, bind, input_shape, tolerance: float):
        self.run, self.bind = run, bind
        self.input_shape = tuple(int(d) for d in input_shape)
        self.tolerance = tolerance


class Runtime:
    """What a runtime does; one subclass per runtime module.

    Attributes:
        name: the runtime's name (`kc.latency.profile(runtime=...)`).
        format: the export format's name (`kc.export(format=...)`).
        suffix: the file's suffix (`""` for a folder).
        packages: `(import name, pip name)` of every package it needs
            beyond keras_csgd's own requirements.
        extra: the keras_csgd extra that installs them.
        keras_format: the format of `model.export` that `write` uses.
        separate_process: latency timing loads each model in a process of
            its own (`keras_csgd.latency.worker`) instead of timing two
            models in this one.
        avx512_block: the channel block with AVX-512F (`channel_block`).
        timed_from_file: latency timing loads the file `quick_write` (or
            `write`) made; `False`: it compiles the model (`compile`).
        block_statistic: how a pair of models timed in interleaved
            blocks compares (`keras_csgd.latency.timing.block_ratio`):
            `"fastest"` (each model's fastest block) or `"median"`.
        profile_error: the share of the full latency a latency table's
            checks allow on this runtime (`kc.latency.profile`'s
            `max_error`), or `None`: 3% (`quality.MAX_ERROR`).
        verify_block_ms: the shortest block of calls verification times
            (`kc.latency.time_against_full`, `kc.plan_for_latency`),
            longer than its 10 ms where the runtime's first call after
            another model's runs slower than the next ones.
    """

    name = ""
    format = ""
    suffix = ""
    keras_format = ""
    packages: tuple[tuple[str, str], ...] = ()
    extra: str | None = None
    separate_process = False
    avx512_block = 8
    timed_from_file = True
    block_statistic = "fastest"
    profile_error: float | None = None
    verify_block_ms = 0.0

    def require(self) -> None:
        """Raises `ImportError` naming the first missing package and the
        extra that installs it."""
        for module, pip in self.packages:
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ImportError(
                    f"The `{self.name}` runtime needs the package `{pip}`: "
                    f"pip install keras-csgd[{self.extra}] (or pip install "
                    f"{pip}). Received: runtime={self.name!r}"
                ) from error

    def versions(self) -> dict:
        """`{pip name: version}` of the packages the latency depends on,
        and `separate_process` where set (all in the latency cache key)."""
        out = {"separate_process": True} if self.separate_process else {}
        for _, pip in self.packages:
            try:
                out[pip] = importlib.metadata.version(pip)
            except importlib.metadata.PackageNotFoundError:
                out[pip] = None
        return out

    def channel_block(self, simd) -> int:
        """The channels the runtime's convolution kernels work in at once
        on a CPU with the SIMD flags `simd` (`kc.latency.timing.machine`):
        a width between two multiples runs about as slowly as the wider
        one, or slower. Profiles measure wide groups at its multiples
        (`kc.latency.design.channel_step`): `avx512_block` with AVX-512F,
        else 8."""
        return self.avx512_block if "avx512f" in simd else 8

    def files(self, path: str) -> list[str]:
        """The paths `write(model, path)` creates (one, or several)."""
        return [path]

    def write(self, model, path: str, data=None, sparse=False) -> None:
        """Writes `model` to `path` with Keras's exporter (unchecked;
        `kc.export` checks it). `data` and `sparse` serve LiteRT."""
        self.require()
        with warnings.catch_warnings():  # Keras's tf2onnx patch for NumPy 2
            warnings.simplefilter("ignore", FutureWarning)
            model.export(os.fspath(path), format=self.keras_format,
                         verbose=False, input_signature=[input_spec(model)])

    def load(self, path: str, threads=None, jit_compile="auto") -> Program:
        """The `Program` of a file `write` made."""
        raise NotImplementedError

    def quick_write(self, model, path: str) -> None:
        """Writes `model` to `path` the quickest way (profiling; unchecked,
        the graph `write` writes): here, `write`."""
        self.write(model, path)

    def served(self, model):
        """`model` as this runtime runs it, with the same layer and group
        names: profiling builds its slim variants from it, which time as
        the slim models of `model` do. Here, `model` itself."""
        return model

    def compile(self, model, threads=None, jit_compile="auto") -> Program:
        """`model` as a `Program`, the quickest way (for profiling): here,
        written by `quick_write` to a temporary file and loaded."""
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, f"model{self.suffix}")
            self.quick_write(model, path)
            return self.load(path, threads, jit_compile)


def relative_error(actual, expected) -> float:
    """`max |actual - expected| / max(1, max |expected|)`."""
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(np.asarray(actual) - expected))) / scale


def check_outputs(model, runtime: Runtime, path: str,
                  samples=None) -> tuple[float, float]:
    """Runs the file at `path` and compares it with `model` (Keras).

    Args:
        model: the Keras model the file was written from.
        runtime: its runtime.
        path: the file.
        samples: inputs; the first `CHECK_SAMPLES` are used. Defaults to
            `None` (uniform `[0, 1)` inputs).

    Returns:
        `(error, tolerance)`: the relative error (see `relative_error`)
        and the largest the loaded program allows (`Program.tolerance`).

    Raises:
        RuntimeError: the error exceeds the tolerance.
    """
    if samples is None:
        samples = random_inputs(model, CHECK_SAMPLES)
    x = np.asarray(samples[:CHECK_SAMPLES], np.float32)
    program = runtime.load(path, jit_compile=False)
    error = relative_error(program.run(x),
                           np.asarray(model(x, training=False)))
    if not error <= program.tolerance:
        raise RuntimeError(
            f"The {runtime.format} file differs from the Keras model by "
            f"{error:.3g} (relative to max(1, max |output|)), more than the "
            f"tolerance {program.tolerance}. Nothing was written; pass "
            "check=False to write it anyway."
        )
    return error, program.tolerance
