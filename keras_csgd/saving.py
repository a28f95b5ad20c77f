"""How the layers of a rebuilt model save to `.keras`.

`rebuild` copies the layers a plan leaves unchanged (`layer_copy`), and a
slim model is a plain functional model that saves layer by layer. A copy
saves as its class when its config loads back (`config_loads`); else as
the constructor arguments Keras recorded for it (`saved_by_arguments`;
keras_hub's DeiT and MiT encoders), and `slim` builds the others as their
traced graphs (`saves`). A copy built by its call saves no build config
(`built_when_called`).

A Keras layer whose activation is an unnamed function (keras_hub's
MobileNetV5 blocks hold `Activation(lambda x: gelu(x, approximate=False))`)
saves it as bytecode, which `Activation` does not load back, in safe mode
or not. `named_activation` finds the Keras activation that computes the
same values, checked on a dense grid of values (never guessed from the
function's source), so that the copy computes and saves with it.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras.src.activations import ALL_OBJECTS_DICT
from keras.src.utils.python_utils import is_default


def saved_by_arguments(layer) -> None:
    """Lets a copy whose own config does not load back save as it was made.

    Keras records the arguments each layer was constructed with; a copy of
    a layer whose `get_config()` fails or does not load back (keras_hub's
    DeiT and MiT encoders) saves those instead, so that the new model
    loads from `.keras`. Keras's own layers are trusted as they are.
    """
    if config_loads(layer):
        return
    made = getattr(layer, "_auto_config", None)
    if made is None:
        return
    base = {"name": layer.name, "trainable": layer.trainable,
            "dtype": keras.dtype_policies.serialize(layer.dtype_policy)}
    layer.get_config = lambda: {**base, **made.config}


def built_when_called(layer) -> None:
    """Lets a copy that builds its sub-layers only when called load back.

    A layer with Keras's default `build` (keras_hub's DeBERTaV3
    `RelativeEmbedding`) is built by running its call on its first inputs,
    which builds its sub-layers. Loaded from the build config Keras saves
    for it, it would be built without them, and the saved weights of its
    sub-layers would find no variables. Such a copy saves no build config:
    the loaded model's graph builds it by calling it, as the original was
    built.
    """
    if not isinstance(layer, keras.layers.Layer) or not is_default(
            layer.build):
        return
    if any(sub.weights for sub in layer._flatten_layers(include_self=False)):
        layer.get_build_config = lambda: None


def config_loads(layer) -> bool:
    """Whether `layer`'s class makes a layer of its config (Keras's own
    layers are trusted)."""
    if type(layer).__module__.startswith("keras."):
        return True
    try:
        type(layer).from_config(layer.get_config())
        return True
    except Exception:  # any failure of a third-party config
        return False


def saves(layer) -> bool:
    """Whether a copy of `layer` saves to `.keras` as its class: its config
    loads back, or Keras recorded the arguments it was made with
    (`saved_by_arguments`). `slim` builds the others as their traced
    graph, which saves layer by layer."""
    return (config_loads(layer)
            or getattr(layer, "_auto_config", None) is not None)


def rebuilt_activation(layer):
    """The activation function a copy or re-creation of `layer` holds.

    Args:
        layer: a called layer.

    Returns:
        `None` when `layer` is no Keras layer with an activation that does
        not serialize (nothing to change); else the Keras activation equal
        to it (`named_activation`), which saves, or the function itself
        (a re-created layer computes with it; its config would hold
        bytecode that does not load).
    """
    if not _unnamed_activation(layer):
        return None
    name = named_activation(layer)
    return keras.activations.get(name) if name else layer.activation


def named_activation(layer) -> str | None:
    """The Keras activation to save a Keras layer's unnamed one as.

    Args:
        layer: a called layer.

    Returns:
        The name of a `keras.activations` function (with its default
        arguments) that gives bit for bit the values of `layer.activation`
        on a dense grid of values of the layer's compute dtype, shaped like
        each output of the layer's calls; `None` when `layer` is no Keras
        layer, its activation serializes as it is, or none is equal.
    """
    if not _unnamed_activation(layer):
        return None
    shapes = {tuple(3 if d is None else d for d in t.shape[1:])
              for node in layer._inbound_nodes for t in node.output_tensors}
    if not shapes:
        return None
    grids = [_grid(shape, layer.compute_dtype) for shape in sorted(shapes)]
    expected = [_values(layer.activation, x) for x in grids]
    for name in sorted(ALL_OBJECTS_DICT):
        candidate = ALL_OBJECTS_DICT[name]
        if all(_identical(_values(candidate, x), y)
               for x, y in zip(grids, expected)):
            return name
    return None


def _unnamed_activation(layer) -> bool:
    """Whether `layer` is a Keras layer whose `activation` is a function
    that does not load back from its serialized form (a lambda)."""
    fn = getattr(layer, "activation", None)
    return (type(layer).__module__.startswith("keras.") and callable(fn)
            and not _serializes(fn))


def _serializes(fn) -> bool:
    """Whether the activation `fn` loads back from its serialized form."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns of a lambda's bytecode
        try:
            return keras.activations.get(
                keras.activations.serialize(fn)) is fn
        except Exception:  # bytecode, an unregistered function, ...
            return False


def _grid(shape, dtype):
    """Values of `dtype` (as a tensor of examples shaped `shape`) that two
    functions must agree on: a dense stretch of [-16, 16], magnitudes from
    the smallest subnormal float32 to the largest of both signs, zeros,
    infinities, NaN and random float32 bit patterns."""
    f32 = np.finfo("float32")
    magnitudes = np.geomspace(float(f32.smallest_subnormal), float(f32.max),
                              20_000).astype("float32")
    bits = np.random.default_rng(0).integers(0, 2**32, 2**16, "uint32")
    values = np.concatenate([
        np.linspace(-16, 16, 2**19 + 1, dtype="float32"),
        magnitudes, -magnitudes, bits.view("float32"),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan], "float32"),
    ])
    size = int(np.prod(shape))
    values = np.resize(values, -(-values.size // size) * size)
    return keras.ops.cast(values.reshape((-1, *shape)), dtype)


def _values(fn, x):
    """`fn(x)` as a NumPy array, or `None` where `fn` fails."""
    try:
        return keras.ops.convert_to_numpy(fn(x))
    except Exception:  # a candidate that does not apply (`glu`)
        return None


def _identical(a, b) -> bool:
    """Whether two arrays hold the same bits (any NaN equals any NaN)."""
    if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = np.isnan(a)
    bits = f"u{a.dtype.itemsize}"
    return bool((nan == np.isnan(b)).all() and (
        a[~nan].view(bits) == b[~nan].view(bits)).all())
