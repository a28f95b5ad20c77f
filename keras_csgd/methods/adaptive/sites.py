"""Where the adaptive gates go in a model, and how they fold back into it.

A gate multiplies layer outputs by non-negative per-channel values. It can
be folded into the weights when the layer is a BatchNormalization with a
`gamma` (gamma and beta scale) or a producer whose activation is positively
homogeneous (`f(s x) = s f(x)` for `s >= 0`: linear, ReLU; kernel and bias
scale).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_csgd import blocks, graph, layers
from keras_csgd.methods.similarity import response_layers
from keras_csgd.rebuild import var_key

_POSITIVELY_HOMOGENEOUS = (keras.activations.linear, keras.activations.relu)


@dataclasses.dataclass
class Site:
    """The layers whose outputs one group's `ChannelGate` multiplies.

    Attributes:
        group: the channel group's name.
        root: its root gid in the analysis.
        size: its number of channels.
        layers: `(layer name, producer)` per layer, where `producer` is the
            group's `(layer name, kernel path, axis)` entry of a producer,
            or `None` for a BatchNormalization.
    """

    group: str
    root: int
    size: int
    layers: list


@dataclasses.dataclass
class Block:
    """A residual block whose branch a `BlockGate` multiplies.

    Attributes:
        branch: the index of the branch among the `Add`'s inputs.
        end: the name of the branch's last layer (where the gate folds).
        producer: `(layer name, kernel path, last axis)` when `end` is a
            producer, `None` for a BatchNormalization.
        ops: names of the branch's operations (dropped with the block).
    """

    branch: int
    end: str
    producer: tuple | None
    ops: set


def foldable(layer) -> bool:
    """Whether a non-negative scale of `layer`'s outputs folds into it."""
    if layers.attribute(layer, "normalizes"):
        return bool(layer.scale)
    return getattr(layer, "activation", None) in _POSITIVELY_HOMOGENEOUS


def channel_sites(model, an: graph.Analysis) -> list[Site]:
    """The gate sites of every prunable group that can be gated.

    A group's gate multiplies the outputs of its BatchNormalization layers,
    or of its producers for a group without BN, and of its producers not
    read only by those BNs. A group is gated only when all these layers are
    top-level, foldable, and their channel axis is exactly the group's
    channels (not after a Concatenate or a depth multiplier).
    """
    readers = graph.successors(model)
    sites = []
    for g in an.groups:
        if not g.prunable:
            continue
        found = response_layers(an, g)
        responders = {lname for _, lname, _ in found}
        candidates = []
        if layers.attribute(found[0][0], "normalizes"):
            candidates = [(lname, None, cmap) for _, lname, cmap in found]
        for entry in g.producers:
            lname = entry[0]
            if not all(r in responders for r in readers.get(lname, [None])):
                candidates.append((lname, entry, g.channel_map(entry[1])))
        if all(
            "/" not in lname
            and foldable(an.layers[lname])
            and np.array_equal(cmap, np.arange(g.size))
            for lname, _, cmap in candidates
        ):
            sites.append(Site(g.name, an.gid_of[g.name], g.size,
                              [(lname, p) for lname, p, _ in candidates]))
    return sites


def gated_blocks(model) -> dict[str, Block]:
    """Residual blocks whose branch can be gated, keyed by their Add name.

    The branch (see `blocks.block_shortcuts`) must end in a foldable layer
    read only by the Add: a BatchNormalization with `scale=True`, or a
    layer whose handler names a foldable kernel (`fold`) with a linear or
    ReLU activation.
    """
    readers = graph.successors(model)
    shortcuts = blocks.block_shortcuts(model, blocks.residual_blocks(model))
    out = {}
    for name, shortcut in shortcuts.items():
        tensor, ops = blocks.branch(model, name, shortcut)
        end = graph.producer_of(tensor)
        handler = layers.handler_for(end)
        if handler is None or readers.get(end.name) != [name]:
            continue
        if not foldable(end):
            continue
        producer = None
        if not handler.normalizes:
            kernel = handler.fold(end)
            if kernel is None:
                continue
            var = getattr(end, kernel)
            producer = (end.name, var.path, len(var.shape) - 1)
        out[name] = Block(1 - shortcut, end.name, producer, ops)
    return out


def folded_values(model, scales) -> dict[str, dict[str, np.ndarray]]:
    """Weights that multiply layers' output channels by gate values.

    Args:
        model: the model whose weights are scaled (the trained gated copy).
        scales: `(layer name, producer, values)` triples (see `Site.layers`
            and `Block`): a BatchNormalization's gamma and beta, or a
            producer's kernel (along its axis) and bias, are multiplied by
            `values` (one per channel, or one for all). A layer named twice
            gets both factors.

    Returns:
        `{layer name: {variable key: array}}`, the `values` of
        `keras_csgd.rebuild.rebuild`.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for lname, producer, values in scales:
        layer = model.get_layer(lname)
        values = np.asarray(values, np.float64)
        if producer is None:
            targets = [(v, 0) for v in (layer.gamma, layer.beta)
                       if v is not None]
        else:
            targets = [(graph.get_variable(model, producer[1]), producer[2])]
            if getattr(layer, "use_bias", False):
                targets.append((layer.bias, 0))
        mine = out.setdefault(lname, {})
        for var, axis in targets:
            key = var_key(layer, var)
            current = mine.get(key, var.numpy())
            shape = [1] * current.ndim
            shape[axis] = values.size
            mine[key] = (current * values.reshape(shape)).astype(var.dtype)
    return out
