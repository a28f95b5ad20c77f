"""Seeing through composite layers: a layer's `call` run on Keras tensors.

A composite layer (keras_hub's `InvertedResidualBlock`, `FusedMBConvBlock`,
a user's block) computes in Python over sub-layers and `keras.ops`. Called
on symbolic `keras.KerasTensor`s instead of values, its `call` leaves the
same node structure a functional model has: every sub-layer call and every
`keras.ops` call becomes a node. `trace` wraps that in a functional model
(named like the layer, its inputs the tensors of the layer's call) that the
analysis walks like a nested model, and `slim` rebuilds in the layer's
place when the plan narrows it.

What the call computes with besides sub-layers and `keras.ops` becomes a
layer of the graph too (`keras_csgd.layers.traced`): the variables the
layer owns and uses directly (`self.class_token`) are read through
`Weight` layers (the attributes holding them are swapped for their
tensors while the call runs), the batch size it reads as a number is a
`shapes.BatchDim` that the reshapes and tiles it reaches turn back into a
tensor's, and the outputs that are no tensors (`None`, constants) of it
and of its sub-layers are kept as `Constant`s.

A layer is not traced when its `call` cannot be replayed as a graph of its
sub-layers: it uses a variable of its own that no attribute holds (it
would enter the graph as a constant), the call fails on symbolic tensors
(Python branching on values, a dynamic size it computes with), or the
traced graph does not compute what the layer does on random inputs
(checked on every trace: a size read while tracing is a constant of the
graph). Those layers freeze the channels they touch, with the reason.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import keras
import numpy as np
from keras.src.ops.node import Node
from keras.src.utils.backend_utils import DynamicBackend

from keras_csgd.graph.nodes import (
    call_arguments,
    is_graph_model,
    topological_nodes,
)
from keras_csgd.graph.shapes import (
    batch_sizes_inferred,
    einsum_shapes_resolved,
)
from keras_csgd.layers.traced import Constant, Weight

_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The input shapes (but the batch) each layer's trace was checked at.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def own_variables(layer) -> list:
    """The variables of `layer` that none of its sub-layers owns."""
    inner = {id(v) for sub in layer._flatten_layers(include_self=False)
             for v in sub.weights}
    return [v for v in layer.weights if id(v) not in inner]


def trace(call):
    """The functional model of one composite layer call, or why not.

    Args:
        call: the `graph.Call` of a layer (not a functional model).

    Returns:
        A functional `keras.Model` named like the layer, with one input per
        input tensor of the call (in `call.inputs` order) and the call's
        outputs, sharing the layer's sub-layers; or a string saying why the
        layer cannot be traced. Traced once per layer and call, checked
        against the layer once per input shape (`_differs`; the batch size
        aside: `graph.static_inputs` traces again at batch size 1).
    """
    layer = call.layer
    key = tuple(id(t) for t in call.inputs)
    cached = _TRACES.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    result = _trace(call)
    _TRACES[layer] = (key, result)
    return result


def _trace(call):
    layer = call.layer
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype)
              for t in call.inputs]
    new_of = {id(t): x for t, x in zip(call.inputs, inputs)}
    args, kwargs = keras.tree.map_structure(
        lambda a: new_of.get(id(a), a), call_arguments(call)
    )
    kwargs = _accepted(layer.call, kwargs)
    try:
        with _replayed(layer, inputs[0]):
            outputs = keras.tree.map_structure(
                lambda o: _as_tensor(o, inputs[0]), layer.call(*args, **kwargs))
        model = keras.Model(inputs if len(inputs) > 1 else inputs[0],
                            outputs, name=layer.name)
    except Exception as e:  # the call is not a graph of its sub-layers
        return f"its call does not trace ({type(e).__name__}: {e})"[:240]
    shapes = tuple((tuple(x.shape[1:]), x.dtype) for x in call.inputs)
    checked = _CHECKED.setdefault(layer, set())
    why = _constants(model, layer) or (
        None if shapes in checked else _differs(call, model))
    if why:
        return why
    checked.add(shapes)
    return model


@contextlib.contextmanager
def _replayed(layer, x):
    """Everything a traced call needs to leave a graph: the batch size as a
    `BatchDim`, static shapes, non-tensor outputs, sub-layers' output specs,
    `keras.ops` for Keras utilities, nested models at the shapes they are
    called with, operations made with Python scalars, and `layer`'s
    variables as `Weight` tensors (called on `x`, the graph's first
    input)."""
    with batch_sizes_inferred(), einsum_shapes_resolved(), \
            _non_tensor_outputs_kept(), output_specs_called(), \
            _keras_ops_backend(), _graph_models_at_call_shapes(), \
            _python_scalars(), _variables_read(layer, x):
        yield


@contextlib.contextmanager
def _graph_models_at_call_shapes():
    """A functional or Sequential model called meanwhile on Keras tensors
    of other shapes than its inputs' (ViTDet's MLP, a Sequential built for
    images of any size, called on a static one) is called as its copy on
    inputs of those shapes: the same layers (`clone_model`), a graph whose
    tensors have the sizes the model computes with (its MACs count)."""
    plain = keras.Model.__call__

    def call(model, *args, **kwargs):
        given = keras.tree.flatten(args[0]) if args else []
        own = _inputs(model) if is_graph_model(model) else []
        if own and all(isinstance(t, keras.KerasTensor) for t in given) and [
                tuple(t.shape[1:]) for t in given] != [
                tuple(t.shape[1:]) for t in own]:
            inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype)
                      for t in given]
            model = keras.models.clone_model(
                model, inputs[0] if len(inputs) == 1 else
                keras.tree.pack_sequence_as(model.input, inputs),
                clone_function=lambda op: op)
        return plain(model, *args, **kwargs)

    keras.Model.__call__ = call
    try:
        yield
    finally:
        keras.Model.__call__ = plain


def _inputs(model) -> list:
    """The inputs of a graph model; none for a Sequential model that was
    built but never called (its layers are called one by one)."""
    try:
        return model.inputs
    except AttributeError:
        return []


def _accepted(fn, kwargs: dict) -> dict:
    """The keyword arguments `fn` takes (`Layer.__call__` passes `training`
    only to calls that take it; the node records it all the same)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


@contextlib.contextmanager
def _variables_read(layer, x):
    """The attributes of `layer` that hold its own variables hold their
    `Weight` tensors meanwhile (called on `x`, the graph's first input)."""
    own = {id(v) for v in own_variables(layer)}
    held = {name: v for name, v in vars(layer).items()
            if isinstance(v, keras.Variable) and id(v) in own}
    for name, v in held.items():
        weight = Weight(v.shape, v, name=name, dtype=v.dtype,
                        trainable=v.trainable)
        object.__setattr__(layer, name, weight(x))
    try:
        yield
    finally:
        for name, v in held.items():
            object.__setattr__(layer, name, v)


@contextlib.contextmanager
def _non_tensor_outputs_kept():
    """Sub-layer calls may return `None` or constants beside tensors
    (DeiT's blocks return `(x, None)`): their nodes record a placeholder
    tensor for each (never read), where Keras would refuse the call."""
    plain = Node.__init__

    def init(node, operation, call_args=None, call_kwargs=None,
             outputs=None):
        if outputs is not None:
            outputs = keras.tree.map_structure(_placeholder, outputs)
        plain(node, operation, call_args, call_kwargs, outputs)

    Node.__init__ = init
    try:
        yield
    finally:
        Node.__init__ = plain


@contextlib.contextmanager
def output_specs_called():
    """A layer whose own `compute_output_spec` fails on the Keras tensors
    it is called with (keras_hub's D-FINE layers reject `training=`; they
    are otherwise only called on backend tensors) gets its output spec
    from its call, as Keras computes it for layers that define none.

    Used while tracing, and while `rebuild` calls a traced graph's layers
    on new Keras tensors.
    """
    plain = keras.layers.Layer.symbolic_call

    def symbolic_call(layer, *args, **kwargs):
        try:
            return plain(layer, *args, **kwargs)
        except TypeError:
            return keras.Operation.compute_output_spec(layer, *args, **kwargs)

    keras.layers.Layer.symbolic_call = symbolic_call
    try:
        yield
    finally:
        keras.layers.Layer.symbolic_call = plain


@contextlib.contextmanager
def _keras_ops_backend():
    """Keras utilities that compute through a backend module of their own
    (`DynamicBackend`: `keras.utils.bounding_boxes.convert_format`, in
    D-FINE's decoder) compute through `keras.ops` meanwhile, which records
    operations on Keras tensors."""
    plain = DynamicBackend.__getattr__

    def getattr_(backend, name):
        return getattr(keras.ops, name)

    DynamicBackend.__getattr__ = getattr_
    try:
        yield
    finally:
        DynamicBackend.__getattr__ = plain


@contextlib.contextmanager
def _python_scalars():
    """Operations made meanwhile with NumPy scalars among their arguments
    (`keras.ops.clip(x, -np.float32(m), np.float32(m))` in D-FINE's
    decoder) are called as their twins made with Python scalars: Keras
    records the arguments of an operation (its config, how a graph of it
    saves) only when they are Python scalars, strings or `None`. The
    traced graph is checked against the layer as ever (`_differs`)."""
    plain_new = keras.Operation.__dict__["__new__"]
    plain_call = keras.Operation.symbolic_call
    made = weakref.WeakSet()  # the operations made with NumPy scalars

    def new(cls, *args, **kwargs):
        if issubclass(cls, keras.layers.Layer) or not any(
                isinstance(a, np.generic)
                for a in keras.tree.flatten((args, kwargs))):
            return plain_new(cls, *args, **kwargs)
        op = plain_new(cls, *keras.tree.map_structure(_python, args),
                       **keras.tree.map_structure(_python, kwargs))
        if getattr(op, "_auto_config", None) is not None:
            made.add(op)
        return op

    def symbolic_call(op, *args, **kwargs):
        if op in made:
            op = type(op).from_config(op.get_config())
        return plain_call(op, *args, **kwargs)

    keras.Operation.__new__ = staticmethod(new)  # as `super().__new__` reads
    keras.Operation.symbolic_call = symbolic_call
    try:
        yield
    finally:
        keras.Operation.__new__ = plain_new
        keras.Operation.symbolic_call = plain_call


def _python(value):
    """A NumPy scalar as the Python scalar of its value."""
    return value.item() if isinstance(value, np.generic) else value


def _placeholder(value):
    if isinstance(value, keras.KerasTensor):
        return value
    return keras.KerasTensor((0,) if value is None else np.shape(value))


def _as_tensor(value, x):
    """An output of the traced call as a tensor of the graph."""
    if isinstance(value, keras.KerasTensor):
        return value
    if value is not None:
        value = keras.ops.convert_to_numpy(value)
    return Constant(value)(x)


def _constants(model, layer) -> str | None:
    """Why the traced `model` holds variables of `layer` as constants, or
    `None`."""
    mine = {id(v): v for v in layer.weights}
    for node in topological_nodes(model):
        for value in keras.tree.flatten(
                (node.arguments.args, node.arguments.kwargs)):
            if isinstance(value, keras.Variable) and id(value) in mine:
                return (f"its call uses the variable {value.name} as a "
                        "constant (no attribute of the layer holds it)")
    return None


def _differs(call, model, batch: int = 2) -> str | None:
    """Why the traced `model` does not compute the layer's call, or `None`.

    Both run on the same random inputs (unknown sizes: `batch`).
    """
    rng = np.random.default_rng(0)
    feeds = []
    for t in call.inputs:
        shape = [d if d is not None else batch for d in t.shape]
        if "float" in str(t.dtype):
            feeds.append(rng.normal(size=shape).astype(t.dtype))
        else:
            feeds.append(rng.integers(0, 2, shape).astype(t.dtype))
    value_of = {id(t): v for t, v in zip(call.inputs, feeds)}
    args, kwargs = keras.tree.map_structure(
        lambda a: value_of.get(id(a), a), call_arguments(call)
    )
    try:
        expected = keras.tree.flatten(call.layer(*args, **kwargs))
        actual = keras.tree.flatten(
            model(feeds if len(feeds) > 1 else feeds[0]))
    except Exception as e:  # the traced graph does not run
        return f"its traced graph fails ({type(e).__name__}: {e})"[:240]
    for a, b in zip(actual, expected):
        if b is None:
            continue
        a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        if a.shape != b.shape or b.size and np.abs(a - b).max() > 1e-4 * (
                1 + np.abs(b).max()):
            return "its traced graph computes something else"
    return None
