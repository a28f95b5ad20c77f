"""The `Context` of a channel analysis: what layer handlers declare their
calls' channels through (`produce`, `member`, `consumer`, `width`, `cost`,
...), the walk of the model's graph that hands every call to its handler
(`run_model`, `visit`, `nest`), and the groups it finds (`finish`)."""

from __future__ import annotations

import math
from fractions import Fraction

import keras
import numpy as np

from keras_csgd import layers
from keras_csgd.graph.layout import (
    Axes,
    group_channels,
    layout_size,
    leaves,
    map_leaves,
)
from keras_csgd.graph.nodes import (
    channels,
    is_graph_model,
    producer_name,
    topological_nodes,
)
from keras_csgd.graph.records import Analysis, Call, Cost, Entry
from keras_csgd.graph.spaces import Spaces
from keras_csgd.graph.trace import trace
from keras_csgd.groups import ChannelGroup


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
        self.uncounted: dict[str, str] = {}
        self.calls: dict[int, int] = {}
        self.traced: dict[str, keras.Model] = {}
        self.weighed: dict[str, tuple] = {}
        self.absorbing: dict[str, tuple] = {}
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

    def absorbs(self, name: str, layout) -> None:
        """The weighing normalization called `name` (`weighs`) writes
        `layout` for a tied output projection alone, which would need each
        merged cluster's column times its size: `slim` multiplies the
        norm's output (its gain, and offset) by the cluster sizes
        instead, so merges stay exact."""
        self.absorbing[name] = layout

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
        """`unknown`, for a call whose MACs nobody records (`why`)."""
        self.uncounted[call.name] = f"{type(call.layer).__name__}: {why}"
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
                        self, tied, lay, tied.name, t, None):
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
            self.uncounted, self.weighed, self.absorbing,
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
