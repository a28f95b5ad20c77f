"""The layer registry: what keras_csgd knows of each layer type.

Every layer type the package can analyse has one *handler*, registered
against its class. The graph analysis (`keras_csgd.graph`), the MAC counter,
`slim`, `fold_batchnorm` and the pretrained-model methods all read it;
nothing else in the package switches on layer types.

A handler is an object with three methods:

- `channels(ctx, call) -> list[layout]`: states how the call's channels
  relate to its variables, through `ctx` (see `graph.Context`): which
  variable axes consume an input layout, which produce a new channel group,
  which are per-channel members of a layout, and the layouts of its
  outputs. It also records the call's MACs with `ctx.cost`.
- `rebuild(config, widths) -> config`: the layer's config with new widths;
  `widths` maps each key the handler declared with `ctx.width` to its new
  size, and `counts` to the channels each channel stands for when the
  handler declared `ctx.weighs` (a normalization whose channels merge).
  It may return a new (unbuilt) layer instead, when the narrower layer is
  of another class (keras_hub's encoders pin their head size in
  a subclass, see `keras_csgd.layers.hub`).
- `config(layer) -> dict` (optional): the config `rebuild` edits;
  `layer.get_config()` by default, or its constructor arguments read from
  its attributes (`arguments`) when that fails (keras_hub's decoder blocks
  always write theirs so, since their own do not load back).
- `fold(layer) -> str | None`: the name of the kernel variable whose last
  axis is the layer's (linear) output channels, into which a following
  BatchNormalization or a constant input can be folded; `None` if none.

`LayerHandler` gives the defaults (`rebuild` sets each width key, `fold`
returns `None`). Lookup is by exact class first; a subclass of a
registered class is handled as that class only when it does not override
`call` (otherwise its computation may differ, and its groups freeze as an
unsupported layer). A handler that raises freezes the groups its call
touches, with the error as the reason (`graph.Context.visit`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math

import keras

_REQUIRED = ("channels", "rebuild", "fold")
_REGISTRY: dict[type, object] = {}
# Handlers of optional packages, imported when one of their layers is first
# looked up: {top-level package of the layer class: handler modules}.
_DEFERRED = {
    "keras_hub": ("keras_csgd.layers.hub", "keras_csgd.layers.hub_simple",
                  "keras_csgd.layers.hub_decoder",
                  "keras_csgd.layers.hub_deberta",
                  "keras_csgd.layers.hub_dfine",
                  "keras_csgd.layers.decoders"),
}


class LayerHandler:
    """Base class of a layer handler (see the module docstring).

    Attributes:
        normalizes: the layer is a per-channel normalization whose inference
            map is `y = scale * (x - mean) + beta` (BatchNormalization):
            what `fold_batchnorm`, ASFP and CaP look for after a producer.
        patches: how compensation (`kc.methods.compensation`) reads the
            layer's input patch vectors, the entries its kernel's rows
            multiply: `"conv"` (every window of a convolution), `"dense"`
            (every vector along the last axis), or `None`: the layer cannot
            be compensated.
        shared: the handler declares every call of a layer called more
            than once (a tied embedding's reverse call); otherwise a second
            call of a layer with weights freezes its groups.
        replaces: `slim` always rebuilds the layer through `rebuild`, even
            at unchanged widths (its own class does not load back from its
            config; `rebuild` returns one that does). Otherwise a layer
            whose widths do not change is copied as it is.
        axes: what the handler knows of channels on other axes than the
            last (`call.axes`, a `graph.Axes` per input): `None` (nothing:
            channels there freeze), `"elementwise"` (every other axis passes
            from the first input to the output, as for an activation or a
            Dense layer), or `"full"` (`channels` reads `call.axes` and may
            return a `graph.Axes` for an output: a reshape, a transpose, a
            matmul).
    """

    normalizes = False
    patches = None
    replaces = False
    shared = False
    axes = None

    def channels(self, ctx, call):
        """Declares the call's channel structure; returns output layouts."""
        raise NotImplementedError

    def gain(self, layer) -> tuple | None:
        """`(variable, offset)`: the per-channel gain of `layer`'s output
        (`offset + variable`), which `slim` may scale (a normalization
        before a tied output projection), or `None` without one."""
        return None

    def config(self, layer) -> dict:
        """The config of `layer` that `rebuild` edits: its own, or, when a
        constructor argument cannot be serialized (a dtype policy object,
        as keras_hub hands its layers when a model is loaded), read from
        its attributes (`arguments`)."""
        try:
            return layer.get_config()
        except NotImplementedError:
            return arguments(layer)

    def rebuild(self, config: dict, widths: dict) -> dict:
        """`config` with each declared width key set to its new size."""
        config.update(widths)
        return config

    def fold(self, layer) -> str | None:
        """The kernel a following per-channel affine map folds into."""
        return None


def register_layer(layer_class: type, handler, override: bool = False):
    """Makes a layer type known to keras_csgd (graph, MACs, slim).

    Args:
        layer_class: the `keras.layers.Layer` subclass.
        handler: an object with `channels`, `rebuild` and `fold` methods,
            usually a `kc.layers.LayerHandler` subclass instance.
        override: replace an existing registration. Defaults to `False`.

    Returns:
        `handler`.

    Raises:
        TypeError: `layer_class` is not a class, or `handler` lacks a
            required method.
        ValueError: `layer_class` is already registered and `override` is
            `False`.

    Example:

    ```python
    class ScaleHandler(kc.layers.LayerHandler):
        def channels(self, ctx, call):
            (lay,) = call.layouts
            ctx.member(call, call.layer.scale, 0, lay)
            return [lay]

    kc.register_layer(MyScale, ScaleHandler())
    ```
    """
    if not inspect.isclass(layer_class):
        raise TypeError(
            "`layer_class` must be a class. "
            f"Received: layer_class={layer_class!r}"
        )
    missing = [m for m in _REQUIRED if not callable(getattr(handler, m, None))]
    if missing:
        raise TypeError(
            f"`handler` must define {', '.join(_REQUIRED)}; it lacks "
            f"{', '.join(missing)}. Subclass `kc.layers.LayerHandler`. "
            f"Received: handler={handler!r}"
        )
    if layer_class in _REGISTRY and not override:
        raise ValueError(
            f"{layer_class.__name__} is already registered; pass "
            "`override=True` to replace its handler. "
            f"Received: layer_class={layer_class!r}"
        )
    _REGISTRY[layer_class] = handler
    return handler


def unregister_layer(layer_class: type) -> None:
    """Removes a registration (a no-op for an unknown class)."""
    _REGISTRY.pop(layer_class, None)


# Activations that mix channels cannot pass a channel group through.
MIXING_ACTIVATIONS = ("softmax", "log_softmax")


def times(n, *factors) -> int | None:
    """`n` times the product of `factors`, or `None` when `n` is (a cost
    of unknown positions)."""
    return None if n is None else n * math.prod(factors)


def mixes_channels(activation) -> bool:
    """Whether an activation function mixes the channels it acts on."""
    if activation is None:
        return False
    return getattr(activation, "__name__", str(activation)) in (
        MIXING_ACTIVATIONS
    )


def attribute(layer, name: str) -> bool:
    """A handler flag (`normalizes`, `sums`, `replaces`, `shared`) of
    `layer`, or False for an unknown layer."""
    return bool(getattr(handler_for(layer), name, False))


def handler_for(layer):
    """The handler of `layer`'s type, or `None` for an unknown layer."""
    cls = type(layer)
    handler = _lookup(cls)
    if handler is None and _load_deferred(cls):
        handler = _lookup(cls)
    return handler


def load_installed() -> None:
    """Imports the deferred handlers of every installed optional package.

    Their modules register the `Pruned...` layer classes that `kc.slim`
    builds, which `keras.saving.load_model` must find in a process that
    has not looked a keras_hub layer up yet.
    """
    for package in [p for p in _DEFERRED if importlib.util.find_spec(p)]:
        for module in _DEFERRED.pop(package):
            importlib.import_module(module)


def _load_deferred(cls: type) -> bool:
    """Imports the deferred handlers of `cls`'s packages; True if any."""
    packages = {c.__module__.split(".")[0] for c in cls.__mro__}
    modules = [m for p in packages & _DEFERRED.keys()
               for m in _DEFERRED.pop(p)]
    for module in modules:
        importlib.import_module(module)
    return bool(modules)


def _lookup(cls: type):
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    for base in cls.__mro__[1:]:
        if base in _REGISTRY:
            return _REGISTRY[base] if cls.call is base.call else None
    return None


def arguments(layer, cls: type | None = None) -> dict:
    """A layer's config, read from its attributes by the parameter names
    of `cls`'s constructor (default: the layer's class), with the base
    layer's `name`, `trainable` and `dtype`.

    Raises:
        ValueError: a parameter without a default is not an attribute.
    """
    config = {"name": layer.name, "trainable": layer.trainable,
              "dtype": keras.dtype_policies.serialize(layer.dtype_policy)}
    params = inspect.signature((cls or type(layer)).__init__).parameters
    for name, param in list(params.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(layer, name):
            config[name] = _serialized(getattr(layer, name))
        elif param.default is param.empty:
            raise ValueError(f"{type(layer).__name__} keeps no `{name}`")
    return config


def _serialized(value):
    """A constructor argument as a config holds it."""
    if value is None or isinstance(value, (bool, int, float, str, list,
                                           tuple, dict)):
        return value
    if inspect.isfunction(value):
        return keras.activations.serialize(value)
    return keras.saving.serialize_keras_object(value)
