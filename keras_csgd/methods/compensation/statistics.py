"""Input statistics of consumer layers: patch vectors and their moments.

`collect_statistics` runs a model over a little data and accumulates, for
each consumer layer, the float64 mean and covariance of the input patch
vectors it reads (`Stats`); `supported` says which layers it can measure.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from keras_csgd import graph, layers
from keras_csgd.batches import input_batches, num_batches
from keras_csgd.methods.moments import RunningMoments


@dataclasses.dataclass(frozen=True)
class Stats:
    """Input statistics of one consumer layer, in float64.

    Attributes:
        mean: `(d,)` mean of the input patch vectors.
        cov: `(d, d)` covariance of the input patch vectors, normalised by
            `count` (the population covariance).
        count: number of patch vectors seen (batch x output positions).
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int


def _patches(x, layer) -> np.ndarray:
    """The layer's input patch vectors as a float64 `(N, d)` array.

    A convolution's patches are extracted by a convolution with an identity
    kernel, which follows the layer's strides, padding and dilation and
    flattens each patch exactly like `kernel.reshape(-1, filters)`.
    """
    if layers.handler_for(layer).patches == "dense":
        x = keras.ops.convert_to_numpy(x)
        return x.reshape(-1, x.shape[-1]).astype(np.float64)
    size = tuple(layer.kernel_size)
    channels = int(x.shape[-1])
    d = math.prod(size) * channels
    eye = keras.ops.eye(d, dtype=x.dtype)
    eye = keras.ops.reshape(eye, size + (channels, d))
    padding = layer.padding
    if padding == "causal":
        left = layer.dilation_rate[0] * (size[0] - 1)
        x = keras.ops.pad(x, [[0, 0], [left, 0], [0, 0]])
        padding = "valid"
    p = keras.ops.conv(
        x,
        eye,
        strides=layer.strides,
        padding=padding,
        dilation_rate=layer.dilation_rate,
    )
    return keras.ops.convert_to_numpy(p).reshape(-1, d).astype(np.float64)


def supported(layer) -> bool:
    """Whether statistics of `layer`'s input can be collected and used."""
    return (
        layers.attribute(layer, "patches")
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and getattr(layer, "groups", 1) == 1
    )


def _default_layers(model) -> list[str]:
    """Consumers of the prunable groups that compensation supports."""
    names = []
    for g in graph.channel_groups(model):
        if not g.prunable or not g.exact:  # see `_searchable`
            continue
        for lname, _, _ in g.consumers:
            if lname in names or "/" in lname:
                continue
            if supported(model.get_layer(lname)):
                names.append(lname)
    return names


def _check_layer(model, name: str):
    try:
        layer = model.get_layer(name)
    except ValueError as e:
        raise ValueError(
            "`layers` must name top-level layers of `model`. "
            f"Received: layers=[..., {name!r}, ...]"
        ) from e
    if not supported(layer):
        raise ValueError(
            "`layers` must name Conv1D, Conv2D or Dense layers (channels "
            f"last, not grouped). Received: {name!r} ({type(layer).__name__})"
        )
    return layer


def collect_statistics(
    model, data, layers=None, max_batches=None, verbose=1, batch_size=64
):
    """Mean and covariance of the input patch vectors of consumer layers.

    For a `Conv1D`/`Conv2D` layer a patch vector is the `kh * kw * in`
    input entries one output position reads, in the order of
    `kernel.reshape(-1, filters)` (the layer's strides, padding and
    dilation apply; zero padding counts as input). For a `Dense` layer it is
    the input vector (after a `Flatten`, the flattened feature map; for
    inputs of rank > 2, every vector along the last axis). Moments are
    accumulated batch by batch in float64.

    Args:
        model: a functional or Sequential `keras.Model`.
        data: inputs in any form `keras_csgd.batches` reads: a NumPy array,
            an `(x, y)` tuple, a `tf.data.Dataset` of `x` or `(x, y, ...)`
            batches, an `.npz` or an image folder.
        layers: names of the consumer layers to measure. Defaults to `None`:
            every Conv1D, Conv2D and Dense consumer of every prunable
            channel group of `model` whose merges are exact (not of a
            prune-only group, `ChannelGroup.exact`).
        max_batches: stop after this many batches. Defaults to `None` (all).
        verbose: `0` silent, `1` progress bar. Defaults to `1`.
        batch_size: batch size for a NumPy `data`. Defaults to `64`.

    Returns:
        A dict `{layer_name: Stats}`.

    Raises:
        ValueError: for a layer that is not a top-level channels-last
            (not grouped) Conv1D, Conv2D or Dense layer of `model`, or for
            empty `data`.

    Example:

    ```python
    stats = compensation.collect_statistics(model, x_train[:2000])
    stats["dense"].mean.shape  # (in_features,)
    ```
    """
    graph.check_functional(model)
    names = _default_layers(model) if layers is None else list(layers)
    chosen = [_check_layer(model, n) for n in names]
    if not chosen:
        return {}
    inputs = model.inputs if len(model.inputs) > 1 else model.inputs[0]
    features = keras.Model(inputs, [layer.input for layer in chosen])
    moments = [None] * len(chosen)
    bar = keras.utils.Progbar(
        num_batches(data, batch_size, max_batches),
        verbose=verbose,
        unit_name="batch",
    )
    seen = 0
    for x in input_batches(data, batch_size):
        if max_batches is not None and seen >= max_batches:
            break
        outs = features(x, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for i, (layer, out) in enumerate(zip(chosen, outs, strict=True)):
            p = _patches(out, layer)
            if moments[i] is None:
                moments[i] = RunningMoments(p.shape[1])
            moments[i].update(p)
        seen += 1
        bar.update(seen)
    if seen == 0:
        raise ValueError("`data` yielded no batches.")
    return {
        n: Stats(m.mean.copy(), m.covariance(), m.n)
        for n, m in zip(names, moments, strict=True)
    }

