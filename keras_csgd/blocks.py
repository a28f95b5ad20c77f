"""Residual blocks: which `Add` layers' branches can be removed.

A residual block ends in a two-input `Add` of a *shortcut* and a *branch*.
Removing the block replaces the Add by its shortcut input (layer removal);
the branch's operations then drop out of the model.
"""

from __future__ import annotations

from collections.abc import Iterable

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
