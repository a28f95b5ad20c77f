"""The one reader of user data: arrays, `(x, y)`, datasets, files, folders.

Every method that reads data (statistics for compensation, feature maps for
similarity and functionality, masks for filter ensembles, calibration for
int8 export, the command line's `--data`) goes through this module, so that
the same `data` is accepted everywhere and read the same way:

- a NumPy array `x` of inputs;
- a tuple `(x,)`, `(x, y)` or `(x, y, sample_weight)` of NumPy arrays;
- a `tf.data.Dataset` (or any iterable) of `x` or `(x, y, ...)` batches;
- a path: an `.npz` file with arrays `x` and `y`, or an image folder
  `path/<class>/<image>` (`kc.data.load_image_folder`), scaled to `[0, 1]`
  and resized to the model's input size when a model is given.
"""

from __future__ import annotations

import math
import os

import numpy as np

from keras_csgd.data import load_image_folder

_KINDS = (
    "a NumPy array, a tuple (x, y) of arrays, a tf.data.Dataset or iterable "
    "of batches, an .npz file or an image folder"
)


def _input_shape(model) -> tuple | None:
    return None if model is None else tuple(model.inputs[0].shape[1:])


def _read_path(path: str, model) -> tuple[np.ndarray, np.ndarray]:
    shape = _input_shape(model)
    if os.path.isfile(path) and path.endswith(".npz"):
        try:
            with np.load(path) as arrays:
                x, y = arrays["x"].astype(np.float32), arrays["y"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(
                "`data` must be an .npz with arrays x and y "
                f"({error}). Received: data={path!r}"
            ) from None
    else:
        size = (32, 32) if shape is None else shape[:2]
        x, y = load_image_folder(path, image_size=size)
        x = x.astype(np.float32) / 255.0
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"`data` {path!r} holds inputs of shape {x.shape[1:]}, the model "
            f"expects {shape}. Received: data={path!r}"
        )
    return x, y


def read(data, model=None):
    """`data` in memory where it names a file or folder; else as it is.

    Args:
        data: any of the forms in the module docstring.
        model: the model the data is for; an image folder is resized to its
            input size and a file's inputs are checked against it. Defaults
            to `None` (folders are read at 32x32).

    Returns:
        `(x, y)` float32 inputs and labels for a path; `(x,)` for an array;
        `data` itself otherwise.

    Raises:
        ValueError: an unreadable file or folder, or inputs of another
            shape than `model`'s.
        TypeError: `data` is `None` or not one of the accepted forms.

    Example:

    ```python
    x, y = batches.read("digits.npz", model)
    ```
    """
    if isinstance(data, (str, os.PathLike)):
        return _read_path(os.fspath(data), model)
    if isinstance(data, np.ndarray):
        return (data,)
    if data is None or not (
        _arrays(data) or hasattr(data, "__iter__")
    ):
        raise TypeError(
            f"`data` must be {_KINDS}. Received: data={type(data).__name__}"
        )
    return data


def _arrays(data) -> bool:
    return isinstance(data, tuple) and 0 < len(data) <= 3 and all(
        isinstance(a, np.ndarray) for a in data
    )


def labelled_batches(data, batch_size: int = 64, model=None):
    """Yields `(x, y)` NumPy batches of `data` (`y` is `None` if unlabelled).

    Args:
        data: any of the forms in the module docstring.
        batch_size: batch size for arrays and files. Defaults to `64`.
        model: see `read`. Defaults to `None`.

    Yields:
        `(x, y)` NumPy batches; a dataset keeps its own batches.

    Example:

    ```python
    for x, y in batches.labelled_batches((x_val, y_val), 128):
        ...
    ```
    """
    data = read(data, model)
    if _arrays(data):
        y = data[1] if len(data) > 1 else None
        for start in range(0, len(data[0]), batch_size):
            stop = start + batch_size
            yield data[0][start:stop], None if y is None else y[start:stop]
        return
    for element in data:
        if isinstance(element, (tuple, list)):
            y = element[1] if len(element) > 1 else None
            yield _numpy(element[0]), y if y is None else np.asarray(y)
        else:
            yield _numpy(element), None


def _numpy(x):
    """A batch of inputs as NumPy: an array, or a dict of them (a model
    with named inputs, keras_hub's `token_ids` and `padding_mask`)."""
    if isinstance(x, dict):
        return {k: np.asarray(v) for k, v in x.items()}
    return np.asarray(x)


def input_batches(data, batch_size: int = 64, model=None):
    """Yields the input batches `x` of `data` (see `labelled_batches`)."""
    for x, _ in labelled_batches(data, batch_size, model):
        yield x


def num_batches(data, batch_size: int = 64,
                max_batches: int | None = None) -> int | None:
    """How many batches `labelled_batches` yields, at most `max_batches`.

    Returns:
        The count, or `None` when it is unknown (an iterable without a
        known `cardinality`).
    """
    if isinstance(data, np.ndarray) or _arrays(data):
        rows = len(data if isinstance(data, np.ndarray) else data[0])
        n = math.ceil(rows / batch_size)
    else:
        cardinality = getattr(data, "cardinality", None)
        n = int(cardinality()) if cardinality is not None else -1
        n = n if n >= 0 else None
    if max_batches is None:
        return n
    return max_batches if n is None else min(n, max_batches)


def fixed_arrays(data, max_samples: int | None = None,
                 name: str = "data") -> np.ndarray:
    """The first (at most `max_samples`) inputs of `data` as one array.

    Args:
        data: any of the forms in the module docstring.
        max_samples: how many samples at most. Defaults to `None` (all).
        name: the argument's name in error messages. Defaults to `"data"`.

    Returns:
        The inputs, concatenated.

    Raises:
        ValueError: `data` holds no sample.
    """
    parts, count = [], 0
    for x in input_batches(data, max_samples or 1024):
        parts.append(x)
        count += len(x)
        if max_samples is not None and count >= max_samples:
            break
    if not count:
        raise ValueError(
            f"`{name}` must hold at least one sample. "
            f"Received: {name}={data!r}"
        )
    return np.concatenate(parts)[:max_samples]


def fixed_batches(data, batch_size: int = 128):
    """Labelled `data` read once into memory: `(x, y, batch_size)`.

    A dataset is read once (a shuffled one is frozen) and keeps its own
    batch size (that of its first batch).

    Args:
        data: labelled data: a tuple `(x, y)` of arrays, an `.npz` file, an
            image folder, or a `tf.data.Dataset` of `(x, y)` batches.
        batch_size: batch size for arrays. Defaults to `128`.

    Returns:
        `(x, y, batch_size)`.

    Raises:
        ValueError: a dataset without `(x, y)` batches (or with none), or
            arrays of different or zero lengths.
        TypeError: `data` of another type.
    """
    import tensorflow as tf

    if isinstance(data, (str, os.PathLike)):
        data = read(data)
    if isinstance(data, tf.data.Dataset):
        batches = list(data.as_numpy_iterator())
        if not batches or any(
            not isinstance(b, tuple) or len(b) != 2 for b in batches
        ):
            raise ValueError(
                "`data` must yield `(x, y)` batches (and at least one). "
                f"Received: element_spec={data.element_spec}"
            )
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        return x, y, len(batches[0][0])
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if len(x) != len(y) or not len(x):
            raise ValueError(
                "`data` arrays `x` and `y` must have the same, non-zero "
                f"length. Received: len(x)={len(x)}, len(y)={len(y)}"
            )
        return x, y, batch_size
    raise TypeError(
        "`data` must be a tf.data.Dataset of (x, y) batches, a tuple (x, y) "
        f"of arrays or a path. Received: data={type(data).__name__}"
    )
