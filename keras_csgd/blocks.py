"""Residual blocks: which `Add` layers' branches can be removed.

A residual block ends in a two-input `Add` of a *shortcut* and a *branch*.
Removing the block replaces the Add by its shortcut input (layer removal);
the branch's operations then drop out of the model.

A block's *gate* is the set of variables whose zeros make its branch output
exactly zero: the scale (and shift) of the branch's last normalization, or
the kernel (and bias) of its last Conv/Dense, behind operations that map
zero to zero (ReLU, dropout, pooling, ...). Methods that promise
`slim = trained` drive the gates of a plan's removed blocks to zero
(`kc.CSGD`, `AsymptoticSoftFilterPruning`); `kc.slim` measures what each
removed branch still contributes (`branch_contributions`).
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np

from keras_csgd import graph, layers


def _is_block_add(layer) -> bool:
    ins = graph.call_inputs(layer)
    return layers.attribute(layer, "sums") and ins is not None and (
        len(ins) == 2
    )


def residual_blocks(model) -> list[str]:
    """Names of the model's top-level two-input `Add` layers, in order.

    Each one ends a residual block that `kc.slim(..., remove_blocks=...)`
    (or a plan's `remove_blocks`) can remove.
    """
    return [layer.name for layer in model.layers if _is_block_add(layer)]


def block_shortcuts(model, names: Iterable[str]) -> dict[str, int]:
    """For each named two-input Add, the index of its shortcut input.

    The shortcut is the input that is an ancestor of the other (identity
    shortcut), else the one with fewer operations since the inputs' last
    common ancestor (projection shortcut).

    Raises:
        ValueError: a name that is not a top-level two-input Add.
    """
    layers = {layer.name: layer for layer in model.layers}
    out = {}
    for name in names:
        layer = layers.get(name)
        if layer is None or not _is_block_add(layer):
            raise ValueError(
                "`remove_blocks` must name top-level two-input Add layers "
                f"of the model. Received: {name!r}"
            )
        ins = graph.call_inputs(layer)
        anc = [graph.ancestors(t) for t in ins]
        if id(ins[0]) in anc[1]:
            out[name] = 0
        elif id(ins[1]) in anc[0]:
            out[name] = 1
        else:
            common = anc[0] & anc[1]
            out[name] = int(len(anc[1] - common) < len(anc[0] - common))
    return out


def branch(model, name: str, shortcut: int):
    """`(branch output tensor, names of the branch's operations)`."""
    ins = graph.call_inputs(model.get_layer(name))
    out = ins[1 - shortcut]
    return out, graph.operations_between(out, graph.ancestors(ins[shortcut]))


def dropped_operations(model, names: Iterable[str]) -> set[str]:
    """Top-level operations that removing the blocks `names` drops."""
    dropped = set()
    for name, shortcut in block_shortcuts(model, names).items():
        dropped |= branch(model, name, shortcut)[1]
        dropped.add(name)
    return dropped


def _maps_zero_to_zero(op, tensor) -> bool:
    """Whether a weightless one-input operation maps zeros to zeros."""
    shape = [1 if d is None else d for d in tensor.shape]
    zeros = keras.ops.zeros(shape, tensor.dtype or "float32")
    try:
        out = op(zeros, training=False)
    except TypeError:
        out = op(zeros)
    return not np.any(keras.ops.convert_to_numpy(out))


def _gate(out) -> tuple[list, str | None]:
    """`(gate variables, None)` of a branch output, or `([], why not)`."""
    tensor = out
    while True:
        op = graph.producer_of(tensor)
        ins = graph.call_inputs(op) if isinstance(
            op, keras.layers.Layer) else None
        if ins is None or isinstance(op, keras.layers.InputLayer):
            return [], f"`{op.name}` is an input or called more than once"
        gamma = getattr(op, "gamma", None)
        kernel = getattr(op, "kernel", None)
        if gamma is not None:
            return [gamma, *[v for v in (getattr(op, "beta", None),)
                             if v is not None]], None
        if kernel is not None and layers.handler_for(op) is not None:
            activation = getattr(op, "activation", None)
            if activation is not None and np.any(keras.ops.convert_to_numpy(
                    activation(keras.ops.zeros((1,))))):
                return [], f"`{op.name}`'s activation is not 0 at 0"
            bias = getattr(op, "bias", None)
            return [kernel, *([bias] if bias is not None else [])], None
        if op.weights or len(ins) != 1:
            return [], (f"`{op.name}` ({type(op).__name__}) can be neither "
                        "gated nor passed")
        if not _maps_zero_to_zero(op, ins[0]):
            return [], f"`{op.name}` does not map 0 to 0"
        tensor = ins[0]


def branch_gates(model, names: Iterable[str]) -> dict[str, list[str]]:
    """The gate variables' paths of each named block (see the module).

    Args:
        model: the functional model.
        names: names of top-level two-input `Add` layers.

    Returns:
        `{block name: [variable path, ...]}`.

    Raises:
        ValueError: a name that is not a block, or a block whose branch has
            no gate (it ends in an operation that is not 0 at 0, such as a
            sigmoid, or in a layer with neither a scale nor a kernel).
    """
    out, missing = {}, []
    for name, shortcut in block_shortcuts(model, names).items():
        variables, why = _gate(branch(model, name, shortcut)[0])
        if why:
            missing.append(f"{name}: {why}")
        out[name] = [v.path for v in variables]
    if missing:
        raise ValueError(
            "These blocks' branches cannot be driven to zero, so removing "
            f"them cannot be exact: {missing}. Leave them out of "
            "`remove_blocks`, or prune with a method that recovers by "
            "fine-tuning (`kc.fine_tune`)."
        )
    return out


def branch_contributions(model, names: Iterable[str], inputs) -> dict:
    """How much each named block's branch adds to its shortcut.

    Args:
        model: the functional model.
        names: names of top-level two-input `Add` layers.
        inputs: a batch of model inputs.

    Returns:
        `{block name: rms(branch) / rms(shortcut)}` on `inputs` (0 for a
        dead branch; the shortcut's RMS floored at 1e-12).
    """
    shortcuts = block_shortcuts(model, names)
    if not shortcuts:
        return {}
    tensors = []
    for name, s in shortcuts.items():
        ins = graph.call_inputs(model.get_layer(name))
        tensors += [ins[s], ins[1 - s]]
    probe = keras.Model(model.input, tensors)
    values = probe(inputs, training=False)
    values = [keras.ops.convert_to_numpy(v).astype(np.float64)
              for v in values]
    rms = [float(np.sqrt(np.mean(np.square(v)))) for v in values]
    return {
        name: rms[2 * i + 1] / max(rms[2 * i], 1e-12)
        for i, name in enumerate(shortcuts)
    }
