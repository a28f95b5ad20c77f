"""Channel-group analysis of a functional Keras model.

The model's own node structure is read, and that of the composite layers it
calls (`trace`: their `call` run on Keras tensors): every tensor gets a
*layout*, the structure of its last (channel) axis in terms of channel groups:

- `("leaf", gid)`: the channels of group `gid`, in order;
- `("cat", (layout, ...))`: a channel-axis concatenation;
- `("tile", layout, t)`: `t` copies (Flatten: positions outer, channels inner);
- `("rep", layout, m)`: every channel repeated `m` times (depth multiplier);
- `("grid", outer, inner)`: every pair of channels, outer-major (grouped
  query heads; an axis a reshape made of several, `grid(heads,
  head_size)`).

A tensor's other axes hold no channels (batch, positions), except where a
reshape or transpose moved channels there (an attention's heads): the
analysis keeps an `Axes` per tensor, one layout (or `None`) per axis.
Handlers that declare `axes` read and return them (`Call.axes`); for the
others, channels on any axis but the last freeze.

Producers (Conv*, Dense, SeparableConv pointwise, Conv*Transpose) start a new
group; per-channel layers (BatchNormalization, DepthwiseConv, PReLU) add their
variables to it; merges (Add, Multiply, ...) unify groups, splits cut them
into parts (`spaces`); consumers record the layout of their input axis. A
group that reaches a model output, an untraceable layer, an unknown
operation or an unmappable reshape is frozen with a reason.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import keras
import numpy as np

from keras_csgd import layers
from keras_csgd.graph.layout import (
    Axes,
    group_channels,
    group_maps,
    layout_size,
    leaves,
    map_leaves,
)
from keras_csgd.graph.nodes import (
    channels,
    check_functional,
    is_graph_model,
    producer_name,
    topological_nodes,
)
from keras_csgd.graph.spaces import Spaces
from keras_csgd.graph.trace import trace
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
    # Calls the registry does not know: their MACs are not in `costs`.
    uncounted: list[str] = dataclasses.field(default_factory=list)
    # Normalizations that weigh merged channels: layer -> its layout.
    weighed: dict[str, tuple] = dataclasses.field(default_factory=dict)

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


class Context(Spaces):
    """What a layer handler declares its call's channels through.

    Layouts are opaque to handlers: they take them from `call.layouts`,
    make new ones with `produce`, `new_group`, `rep`, `tile`, `cat` and
    `split`, and return one per output.
    """

    def __init__(self):
        super().__init__()
        self.entries: list[Entry] = []
        self.layers: dict[str, keras.layers.Layer] = {}
        self.widths: dict[str, dict[str, tuple]] = {}
        self.nested: dict[str, list] = {}
        self.costs: list[Cost] = []
        self.uncounted: list[str] = []
        self.calls: dict[int, int] = {}
        self.traced: dict[str, keras.Model] = {}
        self.weighed: dict[str, tuple] = {}
        # The model inputs' batch size (`None`: dynamic), and for tensors
        # whose dynamic axis holds `batch * k` (windows of an image), `k`.
        self.batch: int | None = None
        self.multiple: dict[int, Fraction | None] = {}
        self.no_channels: dict[int, tuple] = {}  # tensor -> its new group

    # ------------------------------------------------------ for handlers
    def produce(self, call: Call, variable, axis: int, size: int,
                key: str | None = None):
        """A new group whose channels are `variable`'s `axis` (a producer).

        `key`: the config key of the call's layer that holds the width (set
        to the new width when the layer is rebuilt narrower).
        """
        out = self.new_group(size, call.name)
        self.member(call, variable, axis, out, producer=True)
        if key is not None:
            self.width(call, key, out)
        return out

    def member(self, call: Call, variable, axis: int, layout,
               producer: bool = False) -> None:
        """`variable`'s `axis` holds one entry per channel of `layout`."""
        self._add(call, variable, axis, layout, "member", producer)

    def consumer(self, call: Call, variable, axis: int, layout) -> None:
        """`variable`'s `axis` reads the channels of `layout` (summed when
        channels merge)."""
        self._add(call, variable, axis, layout, "consumer")

    def width(self, call: Call, key: str, layout) -> None:
        """The layer's config `key` follows the width of `layout`."""
        self.widths.setdefault(call.name, {})[key] = layout

    def weighs(self, call: Call, layout) -> None:
        """The call's layer normalises `layout`, weighing each channel by
        the number of channels it stands for (its handler's `counts(layer)`,
        `None`: one each): merges stay exact, `slim` handing the handler's
        `rebuild` the new numbers as the width `counts`."""
        self.weighed[call.name] = layout

    def cost(self, call: Call, macs: int | None, *layouts) -> None:
        """The call does `macs` MACs, scaling with each layout's width."""
        self.costs.append(Cost(call.name, macs, layouts))

    def positions(self, t) -> int | None:
        """The entries of one example of tensor `t` along every axis but
        the last (the rows a Dense layer computes), or `None` when a
        dynamic dimension other than the batch leaves it unknown."""
        return self.per_example(tuple(t.shape[:-1]), [t])

    def per_example(self, dims, tensors) -> int | None:
        """The product of `dims` (the sizes of a tensor's axes, or of the
        indices of a contraction) for one example, or `None` when more than
        one dynamic dimension leaves it unknown.

        A dynamic dimension is the batch, and `tensors` say how many
        examples each of its entries holds (`multiple`: windows of an
        image); with static model inputs (`static_inputs`), only the first
        may be (a nested model's own batch). Without one, the sizes hold
        the model's static batch size, if it has one, as a factor.
        """
        dims = tuple(dims)
        known = math.prod(d for d in dims if d is not None)
        if None not in dims:
            batch = self.batch or 1
            return known // batch if known % batch == 0 else known
        k = next((self.multiple[id(t)] for t in tensors
                  if self.multiple.get(id(t), 1) != 1), 1)
        if dims.count(None) > 1 or k is None or (
                self.batch is not None and dims[0] is not None):
            return None  # with static inputs, only a nested model's batch
        return int(known * k)

    def unknown(self, call: Call, why: str, detail: str = "") -> list:
        """Freezes the call's inputs; returns new frozen output layouts."""
        reason = f"{why} `{call.name}` ({type(call.layer).__name__})"
        reason += f": {detail}" if detail else ""
        for axes in call.axes:
            for lay in axes:
                if lay is not None:
                    self.freeze(lay, reason)
        return [self.new_group(channels(t), call.name, reason)
                for t in call.outputs]

    def freeze_axes(self, call: Call, reason: str) -> None:
        """Freezes the channels on every axis but the last of the call's
        inputs."""
        for axes in call.axes:
            for lay in axes[:-1]:
                if lay is not None:
                    self.freeze(lay, reason)

    def uncounted_call(self, call: Call, why: str, detail: str = "") -> list:
        """`unknown`, for a call whose MACs nobody records."""
        self.uncounted.append(call.name)
        return self.unknown(call, why, detail)

    def _add(self, call, var, axis, layout, role, producer=False):
        axis = axis % len(var.shape)
        self.entries.append(
            Entry(call.layer, call.name, var.path, axis, layout, role,
                  producer)
        )

    # ------------------------------------------------------ traversal
    def run_model(self, model, inputs_axes, prefix: str):
        """Walks `model` given the `Axes` of its inputs; returns those of
        its outputs."""
        axes_of: dict[int, Axes] = {}
        for t, axes in zip(model.inputs, inputs_axes):
            axes_of[id(t)] = axes
        for node in topological_nodes(model):
            ins = node.input_tensors
            in_axes = [axes_of[id(t)] for t in ins]
            call = Call(node.operation, prefix + node.operation.name, ins,
                        node.outputs, in_axes, self)
            for t, axes in zip(node.outputs, self.visit(call)):
                axes_of[id(t)] = axes
        return [axes_of[id(t)] for t in model.outputs]

    def last_layout(self, t, axes: Axes):
        """The layout of `t`'s last axis; a new frozen group where it holds
        no channels (attention scores over positions)."""
        if axes[-1] is not None:
            return axes[-1]
        if id(t) not in self.no_channels:
            self.no_channels[id(t)] = self.new_group(
                channels(t), producer_name(t),
                f"no channels on the last axis of `{producer_name(t)}`")
        return self.no_channels[id(t)]

    def visit(self, call: Call) -> list[Axes]:
        """The `Axes` of the call's outputs, its channels declared."""
        op = call.layer
        self.layers[call.name] = op
        self.calls[id(op)] = self.calls.get(id(op), 0) + 1
        self._carry_multiples(call)
        handler = layers.handler_for(op)
        if handler is not None:
            outs = self.handle(handler, call)
        elif not isinstance(op, keras.layers.Layer):
            outs = self.uncounted_call(call, "unsupported operation")
        elif is_graph_model(op) or self.calls[id(op)] > 1:
            outs = self.nest(call, op)
        else:
            graph = trace(call)
            if isinstance(graph, str):
                outs = self.uncounted_call(call, "unsupported layer", graph)
            else:
                self.traced[call.name] = graph
                outs = self.nest(call, graph)
        mode = getattr(handler, "axes", None)
        return [self._as_axes(t, out, call, mode)
                for t, out in zip(call.outputs, outs)]

    def _as_axes(self, t, out, call: Call, mode) -> Axes:
        """An output's `Axes` from what a handler returned for it."""
        if isinstance(out, Axes):
            return out
        rank = max(len(t.shape), 1)
        base = call.axes[0] if call.axes else ()
        if mode == "elementwise" and len(base) != rank:
            for lay in base[:-1]:  # a pooling over them, say
                if lay is not None:
                    self.freeze(lay, f"`{call.name}` removes an axis of "
                                "channels")
        if mode != "elementwise" or len(base) != rank:
            return Axes((*(None,) * (rank - 1), out))
        kept, src = [], call.inputs[0].shape
        for i, lay in enumerate(base[:-1]):
            if lay is not None and t.shape[i] != src[i]:
                self.freeze(lay, f"`{call.name}` changes the size of an "
                            "axis of channels")
                lay = None
            kept.append(lay)
        return Axes((*kept, out))

    def _carry_multiples(self, call: Call) -> None:
        """An output with a dynamic axis holds as many examples per batch
        entry as the call's inputs, unless its handler says otherwise (a
        reshape, `reshape_axes`)."""
        k = next((self.multiple[id(t)] for t in call.inputs
                  if self.multiple.get(id(t), 1) != 1), 1)
        for t in call.outputs:
            if id(t) not in self.multiple and None in tuple(t.shape):
                self.multiple[id(t)] = k

    def nest(self, call: Call, model) -> list[Axes]:
        """Walks a nested functional model (or a traced layer's graph)."""
        lname = call.name
        if self.calls[id(call.layer)] == 1:
            self.nested[lname] = call.axes
            for t, x in zip(call.inputs, model.inputs):
                if id(t) in self.multiple:
                    self.multiple[id(x)] = self.multiple[id(t)]
            outs = self.run_model(model, call.axes, lname + "/")
            for t, x in zip(call.outputs, model.outputs):
                if id(x) in self.multiple:
                    self.multiple[id(t)] = self.multiple[id(x)]
            return outs
        reason = f"layer `{lname}` is shared (called twice)"
        for e in self.entries:
            if e.lname.startswith(lname + "/"):
                self.freeze(e.layout, reason)
        return self.uncounted_call(call, "shared layer")

    def handle(self, handler, call: Call) -> list:
        """A registered handler's declaration of the call's channels."""
        op, lname = call.layer, call.name
        if getattr(handler, "axes", None) is None:
            self.freeze_axes(call, "channels on another axis than the last "
                             f"reach `{lname}` ({type(op).__name__})")
        start, costs = len(self.entries), len(self.costs)
        try:
            outs = handler.channels(self, call)
            self._check_outputs(call, outs)
        except Exception as e:  # a handler's failure freezes, never slims
            del self.entries[start:], self.costs[costs:]
            self.widths.pop(lname, None)
            self.weighed.pop(lname, None)
            return self.uncounted_call(call, f"handler failed ({e})")
        shared = getattr(handler, "shared", False)
        if self.calls[id(op)] > 1 and not shared and (
                getattr(op, "weights", None) or lname in self.widths):
            reason = f"layer `{lname}` is shared (called twice)"
            for e in self.entries:
                if e.layer is op:
                    self.freeze(e.layout, reason)
            for lay in [*call.layouts, *_layouts(outs)]:
                self.freeze(lay, reason)
        if layers.mixes_channels(getattr(op, "activation", None)):
            for lay in _layouts(outs):  # Dense(activation="softmax"), say
                self.freeze(lay, f"channel-mixing activation in `{lname}`")
        return outs

    def _check_outputs(self, call: Call, outs) -> None:
        """Raises unless `outs` has one layout (or `Axes`) per output, each
        as wide as its output's axes."""
        if len(outs) != len(call.outputs):
            raise ValueError(f"{len(outs)} layouts for {len(call.outputs)} "
                             "outputs")
        for t, out in zip(call.outputs, outs):
            shape = tuple(t.shape) or (1,)
            axes = out if isinstance(out, Axes) else (out,)
            if isinstance(out, Axes) and len(out) != len(shape):
                raise ValueError(f"{len(out)} axes for a rank {len(shape)} "
                                 "output")
            for dim, lay in zip(shape[::-1], axes[::-1]):
                if lay is None:
                    continue
                width = layout_size(self.resolve(lay), self.size)
                if dim not in (None, width):
                    raise ValueError(f"a layout of {width} channels for an "
                                     f"output of {dim}")

    # ------------------------------------------------------ results
    def finish(self, model) -> Analysis:
        # A decoder backbone's output is read through its embedding (its
        # CausalLM's logits), which follows it.
        tied = layers.embedding.output_projection(model)
        for t, axes in zip(model.outputs, self.model_outputs):
            for lay in _layouts([axes]):
                if tied is None or not layers.handler_for(tied).reverse(
                        self, tied, lay, tied.name):
                    self.freeze(lay,
                                f"reaches model output `{producer_name(t)}`")
        roots = {g: self.resolve(("leaf", g)) for g in self.parent}
        live = self.live()
        sizes = {r: self.size[r] for r in live}
        by_root: dict[int, list[Entry]] = {}
        for e in self.entries:
            lay = map_leaves(e.layout, roots.__getitem__)
            for g in dict.fromkeys(leaves(lay)):
                by_root.setdefault(g, []).append((e, lay))
        groups, gid_of, used = [], {}, set()
        for root in live:
            es = by_root.get(root, [])
            name = _unique(self.origin[root], used)
            members, producers, maps = [], [], {}
            for e, lay in es:
                if e.role != "member":
                    continue
                members.append((e.lname, e.path, e.axis))
                if e.producer:
                    producers.append((e.lname, e.path, e.axis))
                chans = group_channels(lay, root, sizes)
                if not np.array_equal(chans, np.arange(self.size[root])):
                    maps[e.path] = chans
            consumers = [(e.lname, e.path, e.axis) for e, _ in es
                         if e.role == "consumer"]
            reasons = self.frozen[root]
            if not producers and not reasons:
                reasons = ["has no producer"]
            inexact = self.inexact[root]
            groups.append(ChannelGroup(
                name=name, size=self.size[root], members=tuple(members),
                consumers=tuple(consumers), producers=tuple(producers),
                prunable=not reasons,
                reason="; ".join(reasons) if reasons else None,
                prune_only="; ".join(inexact) if inexact else None,
                maps=maps,
            ))
            gid_of[name] = root
        return Analysis(
            groups, gid_of, self.entries, self.layers, roots, sizes,
            self.widths, self.nested, self.costs, self.traced,
            self.uncounted, self.weighed,
        )


def _layouts(outs) -> list:
    """The layouts of a handler's outputs (every axis of an `Axes`)."""
    out = []
    for o in outs:
        out += [lay for lay in o if lay is not None] if isinstance(
            o, Axes) else [o]
    return out


def _unique(name: str, used: set) -> str:
    out, k = name, 1
    while out in used:
        k += 1
        out = f"{name}#{k}"
    used.add(out)
    return out


def analyze(model) -> Analysis:
    """Channel analysis of `model` (groups, entries, layouts)."""
    check_functional(model)
    an = Context()
    an.batch = model.inputs[0].shape[0] if model.inputs[0].shape else None
    in_axes = []
    for t in model.inputs:
        lay = an.new_group(channels(t), f"input:{producer_name(t)}",
                           "model input")
        in_axes.append(Axes((*(None,) * (len(t.shape) - 1), lay)))
    an.model_outputs = an.run_model(model, in_axes, "")
    return an.finish(model)


def channel_groups(model) -> list[ChannelGroup]:
    """Finds the channel groups of a functional or Sequential Keras model.

    A group is a set of per-channel variables that must be pruned together:
    the output channels of its producers (coupled through Add, Multiply,
    ... into one group), every per-channel variable that follows, and the
    input slices of its consumers.

    Args:
        model: a built functional or Sequential `keras.Model`.

    Returns:
        A list of `ChannelGroup`, in topological order of their first
        producer. Frozen groups (`prunable=False`) say why in `reason`.

    Raises:
        ValueError: for a subclassed model.

    Example:

    ```python
    for g in kc.channel_groups(model):
        print(g.name, g.size, g.prunable, g.reason)
    ```
    """
    return analyze(model).groups
