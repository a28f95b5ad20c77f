"""`rebuild`: the one routine that clones a model with edited layers.

`slim`, `fold_batchnorm`, compensation and the adaptive gates all build a
new model from an old one: some layers get a new config (narrower, with a
bias), some calls are replaced (a removed block's Add by its shortcut, a BN
by its input, an output wrapped in a gate), and the weights are copied over
with some values replaced. Every other layer is copied as it is
(`layer_copy.copy_layer`), never through its config. Nested functional
models are rebuilt too, with their qualified names (`outer/inner`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import keras
import numpy as np

from keras_csgd import graph, layers
from keras_csgd.graph.shapes import einsum_shapes_resolved
from keras_csgd.graph.trace import output_specs_called
from keras_csgd.layer_copy import copy_layer
from keras_csgd.saving import (
    built_when_called,
    rebuilt_activation,
    saved_by_arguments,
)


def var_key(layer, variable) -> str:
    """A variable's path inside its layer (`kernel`, `query/kernel`, ...)."""
    path = variable.path
    head = layer.name + "/"
    if path.startswith(head):
        return path[len(head):]
    at = path.find("/" + head)
    return path[at + len(head) + 1:] if at >= 0 else graph.short_name(variable)


def rebuild(
    model,
    configure: Mapping[str, Callable] | None = None,
    call: Callable | None = None,
    values: Mapping[str, Mapping[str, object]] | None = None,
    input_widths: Callable[[str, keras.Model], list | None] | None = None,
    expand: Mapping[str, keras.Model] | None = None,
):
    """A new functional model with edited layers and copied weights.

    Only what changes is re-created from its config: a layer named in
    `configure`, or one given `values` of another shape than its variables
    (a consumer of narrowed channels). Every other layer is copied as it
    is (`copy_layer`: same class, new variables, no config round trip), so
    a layer whose config does not load back never makes `rebuild` fail,
    and the new model shares no layer or variable with `model`.

    Args:
        model: a functional or Sequential `keras.Model`.
        configure: `{qualified name: edit}`, `edit(old layer, config) ->
            config` for the new layer, or the new (unbuilt) layer itself
            when it is of another class (a handler's `rebuild` may return
            one). Defaults to `None` (no layer edited).
        call: `(qualified name, new layer, args, kwargs) -> outputs` that
            replaces the call of a top-level layer, or returns
            `NotImplemented` for the plain call. Defaults to `None`.
        values: `{qualified name: {variable key: array}}` (`var_key`) that
            replace the copied weights; a new variable with no old
            counterpart and no value (a created bias) is zero. Defaults to
            `None`.
        input_widths: `(qualified name or "", model) -> widths` of the
            inputs of the (nested) model, `None` for unchanged: for each
            input, an int (its last axis) or a tuple (every axis, `None`
            where unchanged). Defaults to
            `None`.
        expand: `{qualified name: functional model}`: layers rebuilt as
            the given model (a composite layer's traced graph,
            `graph.trace`), called on the layer's input tensors. Defaults to
            `None`.

    Returns:
        A new, uncompiled model with the same names, built and weighted.
    """
    configure = configure or {}
    values = values or {}
    expand = expand or {}
    clones: dict[str, tuple] = {}  # name -> (old, new), rebuilt layers
    name_of: dict[int, str] = {}  # id(new layer) -> name

    def clone(source, prefix):
        widths = (input_widths(prefix.rstrip("/"), source)
                  if input_widths else None)
        widths = widths or [None] * len(source.inputs)
        tensors = [graph.input_like(t, w)
                   for t, w in zip(source.inputs, widths)]

        def clone_function(layer):
            name = prefix + layer.name
            if name in expand:
                new = clone(expand[name], name + "/")
            elif graph.is_graph_model(layer):
                new = clone(layer, name + "/")
            elif type(layer) is keras.layers.Identity:
                new = _stateless_copy(layer)  # saves without its config
            else:
                edit = configure.get(name)
                new = None if edit else _copied(layer, values.get(name, {}))
                if new is None and _stateless_without_config(layer):
                    new = _stateless_copy(layer)
                elif new is None:
                    new = _configured(layer, edit)
                    clones[name] = (layer, new)
            name_of[id(new)] = name
            return new

        kwargs = {}
        if expand or (call is not None and not prefix):
            def call_function(layer, *args, **kw):
                name = name_of.get(id(layer))
                if name in expand:
                    return layer(_tensors(args, kw))
                out = NotImplemented
                if call is not None and not prefix:
                    out = call(name, layer, args, kw)
                return layer(*args, **kw) if out is NotImplemented else out

            kwargs["call_function"] = call_function
        if isinstance(source, keras.Sequential):
            return keras.models.clone_model(
                source, tensors[0], clone_function=clone_function
            )
        return keras.models.clone_model(
            source, keras.tree.pack_sequence_as(source.input, tensors),
            clone_function=clone_function, **kwargs,
        )

    # The copy comes back uncompiled: the source's optimizer (C-SGD with
    # its plan, say) does not fit the new variables.
    compiled, model.compiled = model.compiled, False
    try:
        with output_specs_called(), einsum_shapes_resolved():
            new_model = clone(model, "")
    finally:
        model.compiled = compiled
    for name, (old, new) in clones.items():
        if getattr(new, "weights", ()):
            new.set_weights(_weights(old, new, values.get(name, {})))
    return new_model


def with_bias(layer, config: dict) -> dict:
    """A `configure` edit: the layer's config with a bias."""
    return {**config, "use_bias": True}


def _configured(layer, edit):
    """A new layer from `layer`'s config, edited by `edit` if given."""
    handler = layers.handler_for(layer)
    config = handler.config(layer) if hasattr(handler, "config") else (
        layer.get_config())
    new = edit(layer, config) if edit else config
    if not isinstance(new, keras.layers.Layer):
        activation = rebuilt_activation(layer)
        if activation is not None and "activation" in new:
            new = {**new, "activation": activation}
        new = layer.__class__.from_config(new)
    built_when_called(new)
    return new


def _copied(layer, given):
    """`copy_layer(layer)` holding the `given` values, or `None`.

    `None` when a given value has another shape than its variable (the
    layer reads narrowed channels: its config rebuilds it at the new
    width), or when the layer holds a functional model.
    """
    weights = getattr(layer, "weights", ())
    shapes = {var_key(layer, v): tuple(v.shape) for v in weights}
    if any(np.shape(value) != shapes.get(key)
           for key, value in given.items()):
        return None
    try:
        new = copy_layer(layer)
    except TypeError:
        return None
    for v in getattr(new, "weights", ()):
        if var_key(new, v) in given:
            v.assign(given[var_key(new, v)])
    saved_by_arguments(new)
    built_when_called(new)
    activation = rebuilt_activation(layer)
    if activation is not None:
        new.activation = activation
    return new


def _stateless_without_config(layer) -> bool:
    """A layer with no weights whose config cannot be read (keras's
    `Identity(dtype=policy)` inside keras_hub's blocks)."""
    if getattr(layer, "weights", None):
        return False
    try:
        layer.get_config()
    except NotImplementedError:
        return True
    return False


def _stateless_copy(layer):
    """A layer like `layer` (stateless, without config): a new `Identity`,
    else `layer` itself (it holds nothing the copy could differ in)."""
    if type(layer) is keras.layers.Identity:
        return keras.layers.Identity(name=layer.name,
                                     dtype=layer.dtype_policy.name)
    return layer


def _tensors(args, kwargs):
    """The Keras tensors of a call, as a traced graph takes them."""
    flat = [a for a in keras.tree.flatten((args, kwargs))
            if isinstance(a, keras.KerasTensor)]
    return flat if len(flat) > 1 else flat[0]


def _weights(old, new, given) -> list:
    """The new layer's weights: `given` values, else the old ones.

    Variables pair up by position when the layers are of one class and have
    as many (auto-named variables, `variable_18`, differ between copies),
    else by `var_key` (a handler's narrower subclass, a created bias); a
    new variable with no old counterpart and no value (a created bias) is
    zero. `given` is keyed by the old layer's `var_key`.
    """
    olds = list(old.weights)
    by_key = {var_key(old, v): v for v in olds}
    same = type(old) is type(new) and len(olds) == len(new.weights)
    out = []
    for i, v in enumerate(new.weights):
        src = olds[i] if same else by_key.get(var_key(new, v))
        key = var_key(old, src) if src is not None else var_key(new, v)
        if key in given:
            out.append(given[key])
        elif src is not None:
            out.append(src.numpy())
        else:
            out.append(keras.ops.convert_to_numpy(keras.ops.zeros_like(v)))
    return out
