"""Activation importance (Minitron): how strongly a group's readers are fed.

A channel that its readers always see near zero can go. Minitron ranks the
width of a transformer this way, from the activations of a few batches: an
attention head by the L2 norm of its attention output, an MLP unit by its
activation, a hidden channel by the LayerNorm (RMSNorm) output. All three
are the input that a group's *consumers* read: the output projection reads
the heads' attention outputs (`(..., heads, head_dim)`), the MLP's second
projection reads the units' activations, the query, key, value and first MLP
projections read the normalized hidden channels. So one rule serves every
channel group the analysis finds, convolutions included: record the input
of every consumer kernel's layer while the model runs on the data.

References:
    Muralidharan, Sreenivas, Joshi, Chochowski, Patwary, Shoeybi,
    Catanzaro, Kautz, Molchanov. Compact Language Models via Pruning and
    Knowledge Distillation. arXiv 2407.14679.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import keras
import numpy as np

from keras_csgd import graph
from keras_csgd.batches import input_batches


@dataclasses.dataclass(frozen=True)
class _Site:
    """Where a consumer kernel's layer reads its channels.

    `axis`: the channel axis of the layer's input; `inner`: input axes that
    the kernel also contracts per channel (a head's `head_dim`), taken
    together by their L2 norm. Both negative (from the last axis).
    """

    layer: keras.layers.Layer
    axis: int
    inner: tuple[int, ...] = ()


def _einsum_site(layer, kernel_axis: int) -> _Site | None:
    inputs, out = layer.equation.split("->")
    lhs, kernel = inputs.split(",")
    lhs = lhs.removeprefix("...")
    if "." in lhs or kernel[kernel_axis] not in lhs:
        return None
    letter = kernel[kernel_axis]
    inner = tuple(
        i - len(lhs) for i, c in enumerate(lhs)
        if c != letter and c in kernel and c not in out
    )
    return _Site(layer, lhs.index(letter) - len(lhs), inner)


def reader_site(layer, variable, axis: int) -> _Site | None:
    """The input axis of `layer` that a consumer slice of its kernel reads.

    Args:
        layer: the layer that owns `variable` (a sub-layer of a composite
            layer or of `MultiHeadAttention` included).
        variable: a consumer variable of the analysis.
        axis: the consumer axis of `variable`.

    Returns:
        The `_Site`, or `None` when the layer is not a `Dense`,
        `EinsumDense` or convolution reading through its kernel.
    """
    if variable is not getattr(layer, "kernel", None):
        return None
    if isinstance(layer, keras.layers.Dense) and axis == 0:
        return _Site(layer, -1)
    if isinstance(layer, keras.layers.EinsumDense):
        return _einsum_site(layer, axis)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return None
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D,
                          keras.layers.Conv3D, keras.layers.Conv1DTranspose,
                          keras.layers.Conv2DTranspose,
                          keras.layers.Conv3DTranspose)):
        first = getattr(layer, "data_format", None) == "channels_first"
        return _Site(layer, -len(layer.kernel.shape) + 1 if first else -1)
    return None


def _owners(model) -> dict[str, tuple]:
    """`{variable path: (owning layer, variable)}` over all sub-layers."""
    out = {}
    for layer in model._flatten_layers(include_self=True):
        for v in layer._trainable_variables + layer._non_trainable_variables:
            out[v.path] = (layer, v)
    return out


class _Norms:
    """Running sum of the per-channel input norms at one site."""

    def __init__(self, site: _Site):
        self.site = site
        self.sums = None
        self.count = 0

    def update(self, x) -> None:
        x = np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)
        axes = [a % x.ndim for a in (self.site.axis, *self.site.inner)]
        rest = [a for a in range(x.ndim) if a not in axes]
        x = x.transpose(rest + axes)
        channels = x.shape[len(rest)]
        x = x.reshape(-1, channels, math.prod(x.shape[len(rest) + 1:]))
        norms = np.sqrt(np.square(x).sum(axis=2))
        self.sums = norms.sum(axis=0) + (0 if self.sums is None else
                                         self.sums)
        self.count += len(norms)

    def means(self) -> np.ndarray:
        return self.sums / self.count


@contextlib.contextmanager
def _recording(stats: dict[_Site, _Norms]):
    """Every watched layer's `call` records its input while in the block.

    The layer's `call` is shadowed by an instance attribute that records
    and calls it (`Layer.__call__` looks `call` up on the instance); the
    attribute is removed on exit, also on error.
    """
    by_layer: dict[int, list[_Norms]] = {}
    for site, norms in stats.items():
        by_layer.setdefault(id(site.layer), []).append(norms)
    try:
        for watched in by_layer.values():
            layer = watched[0].site.layer

            def call(*args, _original=layer.call, _watched=watched,
                     **kwargs):
                x = args[0] if args else kwargs["inputs"]
                for norms in _watched:
                    norms.update(x)
                return _original(*args, **kwargs)

            layer.__dict__["call"] = call
        yield
    finally:
        for watched in by_layer.values():
            watched[0].site.layer.__dict__.pop("call", None)


def activation_importance(
    model,
    data,
    *,
    batch_size: int = 32,
    max_batches: int | None = None,
) -> dict[str, np.ndarray]:
    """Importance of every channel of every prunable group, from activations.

    The model runs on `data` (eagerly, in inference mode) while the layers
    that consume each group's channels record their inputs: at every
    position (example, token, pixel) a channel's value is the L2 norm of
    its entries in the input (the `head_dim` values of an attention head,
    the one value of an MLP unit or hidden channel), averaged over all
    positions of all batches; a channel read by several layers (the
    hidden width: every query, key, value and MLP projection) or at several
    places of one input (behind `Flatten`) averages them. This is
    Minitron's width importance:

    ```
    head i:    mean over batch and sequence of ||attention output_i||_2
    unit i:    mean |activation_i|  (what the MLP's second projection reads)
    channel i: mean |LayerNorm(x)_i| (what the projections after it read)
    ```

    The readers are `Dense`, `EinsumDense` (attention projections) and
    convolution kernels, inside composite layers too; other consumers are
    not read. Padding tokens count like the others.

    Args:
        model: a functional or Sequential `keras.Model` (a trained one).
        data: model inputs in any form `keras_csgd.batches` reads (arrays,
            `(x, y)`, a `tf.data.Dataset` of batches); labels are ignored.
            A few batches suffice.
        batch_size: batch size for NumPy inputs. Defaults to `32`.
        max_batches: most batches read. Defaults to `None` (all).

    Returns:
        `{group_name: float64 array, one importance per channel}` for every
        prunable group (larger: more important), for `kc.plan_from_scores`
        and `kc.plan_for_latency(scores=...)`.

    Raises:
        ValueError: `data` yields no batch; a prunable group none of whose
            consumers is a `Dense`, `EinsumDense` or convolution kernel, or
            none of them ran.

    Example:

    ```python
    scores = kc.methods.activation_importance(model, x_calibration)
    plan = kc.plan_from_scores(model, scores, keep=0.5)
    small = kc.slim(model, plan)
    kc.fine_tune(small, (x, y), teacher=model)
    ```

    References:
        Muralidharan et al., Compact Language Models via Pruning and
        Knowledge Distillation, arXiv 2407.14679.
    """
    if max_batches is not None and (
            not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(
            "`max_batches` must be a positive int or None. "
            f"Received: max_batches={max_batches!r}"
        )
    an = graph.analyze(model)
    roots = {an.gid_of[g.name]: g for g in an.groups if g.prunable}
    owners = _owners(model)
    stats: dict[_Site, _Norms] = {}
    readers = {gid: [] for gid in roots}  # gid -> [(norms, gids, chans)]
    for entry, gids, chans in an.consumer_maps():
        mine = sorted(set(gids.tolist()) & roots.keys())
        layer, variable = owners.get(entry.path, (None, None))
        if not mine or layer is None:
            continue
        site = reader_site(layer, variable, entry.axis)
        if site is None:
            continue
        norms = stats.setdefault(site, _Norms(site))
        for gid in mine:
            readers[gid].append((norms, gids, chans))
    unread = [roots[gid].name for gid, r in readers.items() if not r]
    if unread:
        raise ValueError(
            "`activation_importance` reads a group's channels in the input "
            "of a `Dense`, `EinsumDense` or convolution consuming it; groups "
            f"{unread[:5]} have no such consumer."
        )
    _run(model, data, batch_size, max_batches, stats)
    return {roots[gid].name: _scores(roots[gid], gid, r)
            for gid, r in readers.items()}


def _run(model, data, batch_size, max_batches, stats) -> None:
    seen = 0
    with _recording(stats):
        for x in input_batches(data, batch_size):
            model(x, training=False)
            seen += 1
            if seen == max_batches:
                break
    if not seen:
        raise ValueError(
            "`data` yielded no batch; activation importance needs a few "
            "batches of inputs."
        )


def _scores(group, gid, readers) -> np.ndarray:
    """The mean over readers of each channel's mean input norm."""
    per_reader = []
    for norms, gids, chans in readers:
        if not norms.count:
            continue
        values = norms.means()
        mine = gids == gid
        sums = np.bincount(chans[mine], values[mine], minlength=group.size)
        counts = np.bincount(chans[mine], minlength=group.size)
        per_reader.append(sums / np.maximum(counts, 1))
    if not per_reader:
        raise ValueError(
            f"No consumer of group {group.name!r} ran on `data`; is the "
            "branch that reads it skipped at inference?"
        )
    return np.mean(per_reader, axis=0)
