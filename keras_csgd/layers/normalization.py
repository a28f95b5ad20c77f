"""Normalization layers: BatchNormalization, LayerNormalization, RMS norms,
per-channel scales.

A normalization over the channels (LayerNormalization, RMS norms) mixes
them through its statistics. Its group stays prunable: removed channels
change the mean and variance the kept ones are normalised with (the slim
model normalises over the kept channels), which methods that recover by
training accept. Merged channels would count once where they counted as
many times as the cluster has members: Keras's LayerNormalization and
RMSNormalization and keras_hub's RMS norms are rebuilt as a
`ClusterNormalization` that weighs them (exact). A norm that cannot be
weighed (LayerNormalization's deprecated `rms_scaling`) makes its group
prune-only (`ChannelGroup.exact`).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_csgd import graph
from keras_csgd.layers.cluster_norm import ClusterNormalization
from keras_csgd.layers.registry import LayerHandler, register_layer

L = keras.layers


class BatchNormHandler(LayerHandler):
    """BatchNormalization over the channel axis: all variables per channel."""

    normalizes = True

    def channels(self, ctx, call):
        layer, (lay,) = call.layer, call.layouts
        if layer.axis not in (-1, len(call.inputs[0].shape) - 1):
            return ctx.unknown(call, "BatchNormalization not over the last "
                               "axis")
        for v in layer.weights:
            ctx.member(call, v, 0, lay)
        return [lay]


def normalized_channels(ctx, call, variables, what: str, layout=None,
                        weighed: bool = False):
    """A normalization over the channels of `layout`; returns the layout.

    Its per-channel `variables` are members. Removing channels changes the
    statistics the others are normalised with (the slim model normalises
    over the kept channels), so only methods that recover by training may.
    Merging them is exact when `slim` can weigh each kept channel by the
    number it stands for (`weighed`: the handler rebuilds it as a
    `ClusterNormalization`); otherwise the group is prune-only.

    Args:
        ctx: the `graph.Context`.
        call: the call whose layer owns `variables`.
        variables: the per-channel weights (channels on their last axis).
        what: the normalization as reasons name it (`"LayerNormalization
            `block/ln`"`).
        layout: the normalised layout. Defaults to the call's first
            input's.
        weighed: the call's own layer normalises `layout` and its handler
            can weigh it (`counts`, and `rebuild` given the width `counts`).
            Defaults to `False` (prune-only).
    """
    lay = call.layouts[0] if layout is None else layout
    for v in variables:
        ctx.member(call, v, -1, lay)
    if weighed:
        ctx.weighs(call, lay)
    else:
        ctx.prune_only(lay, f"{what} normalises over the channels (its "
                       "statistics change when channels go)")
    return lay


class LayerNormHandler(LayerHandler):
    """LayerNormalization: over the channels, its statistics mix them.

    Over the last axis alone, `gamma` and `beta` are per-channel members;
    merged channels are weighed in the slim model (`rebuild` gives a
    `ClusterNormalization` the width `counts`), so merges are
    exact (with the deprecated `rms_scaling`, the group is prune-only).
    Over more axes, the group is frozen.
    """

    what = "LayerNormalization"

    def channels(self, ctx, call):
        layer = call.layer
        rank = len(call.inputs[0].shape)
        axis = getattr(layer, "axis", -1)
        axes = {a % rank for a in (
            axis if isinstance(axis, (list, tuple)) else [axis])}
        if rank - 1 not in axes:
            return [call.layouts[0]]
        if axes != {rank - 1}:
            ctx.freeze(call.layouts[0], f"{self.what} over channels and "
                       f"other axes `{call.name}`")
            return [call.layouts[0]]
        weighed = not getattr(layer, "rms_scaling", False)
        return [normalized_channels(ctx, call, layer.weights,
                                    f"{self.what} `{call.name}`",
                                    weighed=weighed)]

    def counts(self, layer) -> np.ndarray | None:
        """How many channels each channel of `layer` stands for; `None`:
        one each."""
        return None

    def gain(self, layer) -> tuple | None:
        return (layer.gamma, 0.0) if layer.scale else None

    def rebuild(self, config, widths):
        """A `ClusterNormalization` weighing the channels by
        `widths["counts"]` (its weights are copied by name)."""
        return ClusterNormalization(
            widths["counts"], epsilon=config["epsilon"],
            center=config["center"], scale=config["scale"],
            name=config["name"], dtype=config["dtype"])


class RMSNormHandler(LayerNormHandler):
    """`keras.layers.RMSNormalization`: its `scale` per channel."""

    what = "RMSNormalization"

    def gain(self, layer) -> tuple:
        return layer.scale, 0.0

    def rebuild(self, config, widths):
        return ClusterNormalization(
            widths["counts"], rms=True, epsilon=config["epsilon"],
            scale_name="scale", name=config["name"], dtype=config["dtype"])


class ClusterNormHandler(LayerNormHandler):
    """`ClusterNormalization`: its counts add up when channels merge."""

    what = "ClusterNormalization"

    def counts(self, layer) -> np.ndarray:
        return np.asarray(layer.counts)

    def gain(self, layer) -> tuple | None:
        return (layer.gamma, layer.scale_offset) if layer.scale else None

    def rebuild(self, config, widths):
        config.update(widths)
        return config


class NormalizationHandler(LayerHandler):
    """`keras.layers.Normalization`: fixed per-channel statistics."""

    def channels(self, ctx, call):
        ctx.freeze(call.layouts[0],
                   f"per-channel Normalization `{call.name}`")
        return [call.layouts[0]]


class ChannelNormHandler(LayerNormHandler):
    """An RMS norm over the last axis with one scale per channel
    (keras_hub's: `x / sqrt(mean(x ** 2) + eps) * (offset + scale)`): the
    scale is a member, and merged channels are weighed in the slim model
    (a `ClusterNormalization`), so merges are exact. A config key that
    holds the width (`dim`, `input_dim`, `head_dim`) follows the group.

    Args:
        scale: the attribute holding the scale. Defaults to `"scale"`.
        offset: added to the scale (Gemma's `1 + scale`). Defaults to
            `0.0`.
    """

    what = "RMS normalization"
    WIDTH_KEYS = ("dim", "input_dim", "head_dim")

    def __init__(self, scale: str = "scale", offset: float = 0.0):
        self.scale = scale
        self.offset = offset

    def channels(self, ctx, call):
        layer, (lay,) = call.layer, call.layouts
        if getattr(layer, "data_format", None) == "channels_first":
            return ctx.unknown(call, "channels_first layer")
        width = graph.channels(call.inputs[0])
        for key in self.WIDTH_KEYS:
            if getattr(layer, key, None) == width:
                ctx.width(call, key, lay)
        return [normalized_channels(
            ctx, call, [getattr(layer, self.scale)],
            f"{self.what} `{call.name}`", weighed=True)]

    def gain(self, layer) -> tuple:
        return getattr(layer, self.scale), self.offset

    def rebuild(self, config, widths):
        if "counts" not in widths:  # narrower, one count each
            config.update(widths)
            return config
        epsilon = config.get("epsilon", config.get("eps", 1e-6))
        return ClusterNormalization(
            widths["counts"], rms=True, epsilon=epsilon,
            scale_name=self.scale, scale_offset=self.offset,
            name=config["name"], dtype=config["dtype"])


class ScaleHandler(LayerHandler):
    """`x * scale`, one learned scale per channel (LayerScale).

    Args:
        variable: the attribute holding the scale.
        key: the config key of the width. Defaults to `None` (none).
    """

    def __init__(self, variable: str, key: str | None = None):
        self.variable = variable
        self.key = key

    def channels(self, ctx, call):
        (lay,) = call.layouts
        ctx.member(call, getattr(call.layer, self.variable), -1, lay)
        if self.key is not None:
            ctx.width(call, self.key, lay)
        return [lay]


register_layer(L.BatchNormalization, BatchNormHandler())
register_layer(L.LayerNormalization, LayerNormHandler())
register_layer(ClusterNormalization, ClusterNormHandler())
if hasattr(L, "RMSNormalization"):  # Keras 3.9 and later
    register_layer(L.RMSNormalization, RMSNormHandler())
register_layer(L.Normalization, NormalizationHandler())
