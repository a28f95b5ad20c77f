"""Queries on a functional model's node graph.

The only code of the package that reads Keras's private node structure
(`_keras_history`, `_inbound_nodes`, `_outbound_nodes`).
"""

from __future__ import annotations

import contextlib

import keras
from keras.src.models.functional import Functional

from keras_csgd import layers
from keras_csgd.graph.shapes import einsum_shapes_resolved

# Where an operation keeps the nodes of its calls (a copy starts empty).
NODE_LISTS = ("_inbound_nodes", "_outbound_nodes")


def channels(t) -> int:
    """Size of a tensor's last (channel) axis (1 for a scalar)."""
    dim = t.shape[-1] if len(t.shape) else 1
    return int(dim) if dim is not None else 1


def topological_nodes(model):
    """The model's nodes from inputs to outputs, each once."""
    nodes, seen = [], set()
    stack = [(t._keras_history.operation, t._keras_history.node_index)
             for t in model.outputs]
    order = []
    # Iterative post-order DFS over the node graph.
    visit = [(op, idx, False) for op, idx in reversed(stack)]
    while visit:
        op, idx, done = visit.pop()
        key = (id(op), idx)
        if done:
            if key not in seen:
                seen.add(key)
                order.append(op._inbound_nodes[idx])
            continue
        if key in seen:
            continue
        visit.append((op, idx, True))
        for t in op._inbound_nodes[idx].input_tensors:
            h = t._keras_history
            if (id(h.operation), h.node_index) not in seen:
                visit.append((h.operation, h.node_index, False))
    for node in order:
        if not isinstance(node.operation, keras.layers.InputLayer):
            nodes.append(node)
    return nodes


def producer_of(tensor):
    """The operation that computed a Keras tensor."""
    return tensor._keras_history.operation


def producing_call(tensor) -> tuple:
    """`(operation, input tensors)` of the call that computed a Keras
    tensor; `(None, [])` for a graph input."""
    h = getattr(tensor, "_keras_history", None)
    op = h.operation if h else None
    if op is None or isinstance(op, keras.layers.InputLayer):
        return None, []
    return op, list(op._inbound_nodes[h.node_index].input_tensors)


def producer_name(tensor) -> str:
    """The name of the operation (or input layer) of a Keras tensor."""
    return tensor._keras_history.operation.name


def call_inputs(layer) -> list | None:
    """The input tensors of `layer`'s only call, or `None` (0 or 2+ calls)."""
    nodes = layer._inbound_nodes
    return list(nodes[0].input_tensors) if len(nodes) == 1 else None


def call_arguments(call) -> tuple[tuple, dict]:
    """The positional and keyword arguments `call` was made with.

    Keras tensors among them are the ones of `call.inputs`; a handler maps
    them to layouts by identity (`MultiHeadAttention(query=..., value=...)`).
    """
    h = call.outputs[0]._keras_history
    args = h.operation._inbound_nodes[h.node_index].arguments
    return args.args, args.kwargs


def sole_reader(layer):
    """The one operation that reads `layer`'s output, or `None`.

    `None` too when `layer` is called more than once.
    """
    if len(layer._inbound_nodes) != 1 or len(layer._outbound_nodes) != 1:
        return None
    return layer._outbound_nodes[0].operation


def read_only_by(layer, reader) -> bool:
    """Whether `layer` is called once and its output is read by `reader`
    alone (`None`: by no layer of the graph, a model output alone)."""
    return len(layer._inbound_nodes) == 1 and [
        n.operation for n in layer._outbound_nodes
    ] == ([] if reader is None else [reader])


def following_batchnorm(layer, scaled: bool = False):
    """The BatchNormalization over the last axis that alone reads `layer`.

    Args:
        layer: a layer called once.
        scaled: require the BatchNormalization to have a `gamma`.

    Returns:
        The BatchNormalization layer, or `None`.
    """
    bn = sole_reader(layer)
    if bn is None or not layers.attribute(bn, "normalizes"):
        return None
    rank = len(layer.output.shape)
    if bn.axis not in (-1, rank - 1) or (scaled and not bn.scale):
        return None
    return bn


def ancestors(tensor) -> set[int]:
    """Ids of `tensor` and of every Keras tensor it was computed from."""
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        h = t._keras_history
        stack.extend(h.operation._inbound_nodes[h.node_index].input_tensors)
    return seen


def operations_between(start, stop: set[int]) -> set[str]:
    """Names of the operations computing `start` from tensors in `stop`."""
    names, seen, stack = set(), set(), [start]
    while stack:
        t = stack.pop()
        if id(t) in stop or id(t) in seen:
            continue
        seen.add(id(t))
        h = t._keras_history
        names.add(h.operation.name)
        stack.extend(h.operation._inbound_nodes[h.node_index].input_tensors)
    return names


def successors(model) -> dict[str, list[str | None]]:
    """Names of the top-level operations that read each operation's output.

    A model output counts as a reader named `None`.
    """
    out: dict[str, list] = {}
    for node in topological_nodes(model):
        for t in node.input_tensors:
            out.setdefault(producer_name(t), []).append(node.operation.name)
    for t in model.outputs:
        out.setdefault(producer_name(t), []).append(None)
    return out


def input_like(tensor, width=None):
    """A new `keras.Input` like a model input (same name, same first axis:
    a traced layer's input may be a tensor of one entry, not a batch).

    Args:
        tensor: the model input.
        width: its new number of channels (last axis), or a new size for
            every axis (a tuple, `None` where unchanged). Defaults to
            `None` (the same shape).
    """
    shape = list(tensor.shape)
    if isinstance(width, tuple):
        shape = [d if w is None else w for d, w in zip(shape, width)]
    elif width is not None:
        shape[-1] = width
    return keras.Input(batch_shape=shape, dtype=tensor.dtype,
                       name=producer_name(tensor))


def is_graph_model(model) -> bool:
    """Whether `model` is functional or Sequential (its graph can be read)."""
    return isinstance(model, (Functional, keras.Sequential))


def check_functional(model) -> None:
    """Raises `ValueError` unless `model` is a built functional/Sequential."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r}"
        )
    if not is_graph_model(model):
        raise ValueError(
            "`model` must be a functional or Sequential Keras model; "
            f"{type(model).__name__} is a subclassed model, whose graph "
            "cannot be read. Rebuild it with the functional API "
            "(keras.Input -> layers -> keras.Model)."
        )


@contextlib.contextmanager
def static_inputs(model, input_shape):
    """`model` called on inputs of static shape, for as long as needed.

    Every layer is called again, nested models included (each rebuilt on
    static inputs under its own name), so every tensor of the returned
    model has the static shapes that follow from `input_shape`. The layers
    are `model`'s own (no copy, no weights moved); the nodes these calls
    add to them are removed on exit, leaving `model` as it was.

    Args:
        model: a functional or Sequential `keras.Model`.
        input_shape: the shape of one example (no batch axis), for every
            input alike (`(128,)`: token ids and a padding mask of 128),
            or a list of them in `model.inputs` order, or a dict by input
            name. `None` entries keep the model's own dimension.

    Yields:
        A functional model of `model`'s layers on static-shape inputs.

    Raises:
        ValueError: a shape does not fit its input.
    """
    shapes = _input_shapes(model, input_shape)
    marks = [(op, [len(getattr(op, n)) for n in NODE_LISTS])
             for op in _operations(model)]

    def call_function(layer, *args, **kwargs):
        if is_graph_model(layer):
            inner = [keras.Input(batch_shape=t.shape, dtype=t.dtype)
                     for t in keras.tree.flatten(args[0])]
            # Keras clones a Sequential model without a call function.
            nested = {} if isinstance(layer, keras.Sequential) else {
                "call_function": call_function}
            layer = keras.models.clone_model(
                layer, keras.tree.pack_sequence_as(layer.input, inner),
                clone_function=lambda op: op, **nested,
            )
        return layer(*args, **kwargs)

    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    inputs = [keras.Input(batch_shape=(1, *s), dtype=t.dtype,
                          name=producer_name(t))
              for t, s in zip(model.inputs, shapes)]
    try:
        with einsum_shapes_resolved():
            static = keras.models.clone_model(
                model, keras.tree.pack_sequence_as(model.input, inputs),
                clone_function=lambda op: op, call_function=call_function,
            )
        yield static
    finally:
        for op, lengths in marks:
            for name, n in zip(NODE_LISTS, lengths):
                del getattr(op, name)[n:]


def _operations(model) -> list:
    """Every operation of `model` and of its nested models."""
    out = []
    for op in getattr(model, "operations", None) or model.layers:
        out.append(op)
        if is_graph_model(op):
            out.extend(_operations(op))
    return out


def _input_shapes(model, input_shape) -> list[tuple]:
    """One full example shape per model input (see `static_inputs`)."""
    given = input_shape
    if isinstance(given, dict):
        given = [given.get(producer_name(t)) for t in model.inputs]
    elif not (given and isinstance(given[0], (list, tuple))):
        given = [given] * len(model.inputs)
    shapes = []
    for t, shape in zip(model.inputs, given):
        own = tuple(t.shape[1:])
        shape = own if shape is None else tuple(shape)
        fits = len(shape) == len(own) and all(
            d is None or s is None or d == s for d, s in zip(own, shape))
        if len(given) != len(model.inputs) or not fits:
            raise ValueError(
                "`input_shape` must give every model input a shape of its "
                f"rank without the batch axis (inputs: "
                f"{[tuple(x.shape[1:]) for x in model.inputs]}), matching "
                f"its static dimensions. Received: input_shape={input_shape!r}"
            )
        shapes.append(tuple(o if g is None else g for g, o in zip(shape, own)))
    return shapes
