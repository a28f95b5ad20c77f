"""What the channel analysis records and returns: a variable axis's
`Entry`, a call's `Cost`, the `Call` a handler sees, and the `Analysis`."""

from __future__ import annotations

import dataclasses

import keras

from keras_csgd.graph.layout import group_maps, map_leaves
from keras_csgd.groups import ChannelGroup


@dataclasses.dataclass
class Entry:
    """One channel axis of one variable, with the layout of that axis."""

    layer: keras.layers.Layer
    lname: str
    path: str
    axis: int
    layout: tuple
    role: str  # "member" (per-channel, selected) or "consumer" (summed)
    producer: bool = False


@dataclasses.dataclass
class Analysis:
    """Everything `slim` and the methods need about a model's channels."""

    groups: list[ChannelGroup]
    gid_of: dict[str, int]  # group name -> root gid
    entries: list[Entry]
    layers: dict[str, keras.layers.Layer]  # qualified name -> layer
    roots: dict[int, tuple]  # gid -> its layout in live groups
    sizes: dict[int, int]  # live group (root gid) -> size
    widths: dict[str, dict[str, tuple]]  # layer -> {config key: layout}
    nested: dict[str, list]  # qualified nested-model name -> input layouts
    costs: list[Cost]
    traced: dict[str, keras.Model]  # composite layer -> its traced graph
    # Calls whose MACs are not in `costs`: name -> why.
    uncounted: dict[str, str] = dataclasses.field(default_factory=dict)
    # Normalizations that weigh merged channels: layer -> its layout.
    weighed: dict[str, tuple] = dataclasses.field(default_factory=dict)
    # Of those, the ones whose output a tied output projection alone reads
    # (`Context.absorbs`): layer -> its layout.
    absorbing: dict[str, tuple] = dataclasses.field(default_factory=dict)

    def root(self, layout: tuple) -> tuple:
        """The layout with every gid replaced by its root."""
        return map_leaves(layout, self.roots.__getitem__)

    def consumer_maps(self):
        """Every consumer entry with the channels its input axis reads.

        Yields:
            `(entry, gids, channels)`: for each index along the entry's
            axis, the root gid and the channel of that group it reads. An
            entry that reads two groups at once (grouped-query heads, a
            grid layout) is yielded once per group, with gid -1 where the
            other group is read.
        """
        for e in self.entries:
            if e.role == "consumer":
                for gids, chans in group_maps(self.root(e.layout),
                                              self.sizes):
                    yield e, gids, chans

    def entries_of(self, lname: str) -> list[Entry]:
        """The entries of one (qualified) layer."""
        return [e for e in self.entries if e.lname == lname]


class Call:
    """One call of a layer in the model graph, as a handler sees it.

    Attributes:
        layer: the layer.
        name: its qualified name (`outer/inner` inside nested models).
        inputs: the input Keras tensors.
        outputs: the output Keras tensors.
        axes: the `Axes` of every input tensor.
        layouts: the channel layout of every input tensor's last axis (a
            new frozen group where it holds none, made when first read).
    """

    def __init__(self, layer, name: str, inputs, outputs, axes, ctx):
        self.layer, self.name = layer, name
        self.inputs, self.outputs, self.axes = inputs, outputs, axes
        self._ctx = ctx
        self._layouts = None

    @property
    def layouts(self) -> list:
        if self._layouts is None:
            self._layouts = [self._ctx.last_layout(t, a)
                             for t, a in zip(self.inputs, self.axes)]
        return self._layouts


@dataclasses.dataclass
class Cost:
    """MACs of one layer call, and the layouts they scale with.

    At a plan, the MACs are `macs * prod(kept share of each layout)`.
    """

    lname: str
    macs: int | None  # None: a spatial dimension is unknown
    layouts: tuple
