"""`copy_layer`: a layer's copy with its own variables, made without config.

`rebuild` (and so `slim`) copies every layer a plan leaves unchanged this
way instead of through `get_config()` / `from_config()`: many layers'
configs do not load back (keras_hub's DeiT, MiT, Swin, Llama and Qwen3
layers among them), and an unchanged layer has no reason to be re-created.

The copy shares nothing mutable with the original: each layer of its tree
(the layer and its sub-layers) is a new object of the same class, and each
variable is new, holding the same value; methods and closures kept on the
instance (Keras's `build` wrapper) are re-bound to the copy. Training one
model leaves the other as it was. What is immutable or has no state
(dtype policies, initializers, activation functions, modules, Keras
tensors) is shared.
The copy has not been called: it has no nodes until `rebuild` calls it on
the new model's tensors.
"""

from __future__ import annotations

import copy
import types

import keras
from keras.src.utils import tracking

from keras_csgd import graph


def copy_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A copy of `layer` (sub-layers and variables new), no config used.

    Args:
        layer: a built `keras.layers.Layer` or operation.

    Returns:
        A new, built layer of the same class, with the same name and the
        same variable values, not yet called.

    Raises:
        TypeError: the layer is, or holds, a functional or Sequential
            model: its graph of nodes would still call the original's
            layers (`rebuild` clones such models node by node).

    Example:

    ```python
    twin = copy_layer(model.get_layer("encoder"))
    twin.trainable_variables[0] is not model.get_layer(
        "encoder").trainable_variables[0]  # True
    ```
    """
    memo: dict[int, object] = {}
    with tracking.DotNotTrackScope():
        new = _copy(layer, memo)
    for obj in memo.values():
        tracker = getattr(obj, "__dict__", {}).get("_tracker")
        if isinstance(tracker, tracking.Tracker):
            tracker.stored_ids = {
                name: {id(v) for v in store}
                for name, (_, store) in tracker.config.items()
            }
    return new


def _copy(obj, memo: dict):
    """A copy of `obj` for `copy_layer` (see the module docstring)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, (list, tuple, dict, set)):
        return _copy_container(obj, memo)
    if isinstance(obj, keras.Variable):
        new = _shell(obj, memo)
        new.__dict__.update(obj.__dict__)
        new._value = copy.deepcopy(obj._value)
        return new
    if graph.is_graph_model(obj):
        raise TypeError(
            "`copy_layer` cannot copy a functional or Sequential model (or "
            f"a layer holding one). Received: layer={obj.name!r}"
        )
    if isinstance(obj, types.MethodType) and id(obj.__self__) in memo:
        return types.MethodType(obj.__func__, memo[id(obj.__self__)])
    if isinstance(obj, types.FunctionType) and obj.__closure__:
        return _copy_closure(obj, memo)
    if isinstance(obj, (keras.Operation, tracking.Tracker,
                        keras.random.SeedGenerator)):
        new = _shell(obj, memo)
        for key, value in obj.__dict__.items():
            fresh = key in graph.NODE_LISTS
            new.__dict__[key] = [] if fresh else _copy(value, memo)
        return new
    return obj


def _copy_closure(fn, memo: dict):
    """`fn` over copies of what its closure holds.

    Keras wraps each layer's `build` in a closure over the layer, kept on
    the instance: the copy's must build the copy.
    """
    cells = []
    for cell in fn.__closure__:
        try:
            cells.append(types.CellType(_copy(cell.cell_contents, memo)))
        except ValueError:  # an empty cell
            cells.append(types.CellType())
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__,
                             fn.__defaults__, tuple(cells))
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    memo[id(fn)] = new
    new.__dict__.update({k: _copy(v, memo) for k, v in fn.__dict__.items()})
    return new


def _shell(obj, memo: dict):
    """An empty object of `obj`'s class, recorded as its copy."""
    cls = type(obj)
    builtin = next(b for b in cls.__mro__ if b in (list, dict, set, object))
    new = builtin.__new__(cls)
    memo[id(obj)] = new
    return new


def _copy_container(obj, memo: dict):
    """A list, tuple, dict or set (Keras's tracked ones too), copied."""
    if isinstance(obj, tuple):
        items = [_copy(v, memo) for v in obj]
        new = type(obj)(*items) if hasattr(obj, "_fields") else (
            type(obj)(items))
        memo[id(obj)] = new
        return new
    if not issubclass(type(obj), (list, dict, set)):
        # TensorFlow's tracking proxies (`_DictWrapper`): a plain copy.
        plain = dict(obj) if isinstance(obj, dict) else list(obj)
        memo[id(obj)] = new = _copy(plain, memo)
        return new
    new = _shell(obj, memo)
    if isinstance(obj, dict):
        dict.update(new, {k: _copy(v, memo) for k, v in obj.items()})
    elif isinstance(obj, list):
        list.extend(new, [_copy(v, memo) for v in obj])
    else:
        set.update(new, {_copy(v, memo) for v in obj})
    for key, value in getattr(obj, "__dict__", {}).items():
        new.__dict__[key] = _copy(value, memo)
    return new
