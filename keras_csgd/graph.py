"""Channel-group analysis of a functional Keras model.

The model's own node structure is read (no tracing): every tensor gets a
*layout*, the structure of its last (channel) axis in terms of channel groups:

- `("leaf", gid)`: the channels of group `gid`, in order;
- `("cat", (layout, ...))`: a channel-axis concatenation;
- `("tile", layout, t)`: `t` copies (Flatten: positions outer, channels inner);
- `("rep", layout, m)`: every channel repeated `m` times (depth multiplier).

Producers (Conv*, Dense, SeparableConv pointwise, Conv*Transpose) start a new
group; per-channel layers (BatchNormalization, DepthwiseConv, PReLU) add their
variables to it; merges (Add, Multiply, ...) unify groups; consumers record
the layout of their input axis. A group that reaches a model output, an
unknown layer or an unmappable reshape is frozen with a reason.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras.src.models.functional import Functional

from keras_csgd.groups import ChannelGroup

L = keras.layers

CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
TRANSPOSE = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_MERGE = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
_PASS = (
    L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D,
    L.SpatialDropout2D, L.SpatialDropout3D, L.GaussianNoise,
    L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D,
    L.AveragePooling2D, L.AveragePooling3D, L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D, L.GlobalMaxPooling3D, L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D, L.GlobalAveragePooling3D, L.ZeroPadding1D,
    L.ZeroPadding2D, L.ZeroPadding3D, L.UpSampling1D, L.UpSampling2D,
    L.UpSampling3D, L.Cropping1D, L.Cropping2D, L.Cropping3D, L.Identity,
    L.Rescaling,
)
# Activations that mix channels cannot pass a channel group through.
_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


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
    roots: dict[int, int]  # gid -> root gid
    sizes: dict[int, int]  # root gid -> size
    reshapes: dict[str, tuple]  # qualified reshape name -> input layout
    nested: dict[str, list]  # qualified nested-model name -> input layouts

    def root(self, layout: tuple) -> tuple:
        """The layout with every gid replaced by its root."""
        return _map_leaves(layout, lambda g: ("leaf", self.roots[g]))


def _map_leaves(layout, fn):
    kind = layout[0]
    if kind == "leaf":
        return fn(layout[1])
    if kind == "cat":
        return ("cat", tuple(_map_leaves(p, fn) for p in layout[1]))
    return (kind, _map_leaves(layout[1], fn), layout[2])


def leaves(layout) -> list[int]:
    """The gids a layout reads."""
    if layout[0] == "leaf":
        return [layout[1]]
    if layout[0] == "cat":
        return [g for p in layout[1] for g in leaves(p)]
    return leaves(layout[1])


def layout_size(layout, sizes) -> int:
    """Number of entries of a layout, with `sizes[gid]` channels per leaf."""
    kind = layout[0]
    if kind == "leaf":
        return sizes[layout[1]]
    if kind == "cat":
        return sum(layout_size(p, sizes) for p in layout[1])
    return layout_size(layout[1], sizes) * layout[2]


def flat_channels(layout, sizes) -> tuple[np.ndarray, np.ndarray]:
    """(gid, channel) of every entry of a layout, in order."""
    kind = layout[0]
    if kind == "leaf":
        n = sizes[layout[1]]
        return np.full(n, layout[1]), np.arange(n)
    if kind == "cat":
        parts = [flat_channels(p, sizes) for p in layout[1]]
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )
    g, c = flat_channels(layout[1], sizes)
    if kind == "tile":
        return np.tile(g, layout[2]), np.tile(c, layout[2])
    return np.repeat(g, layout[2]), np.repeat(c, layout[2])


class _Analyzer:
    def __init__(self):
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.origin: dict[int, str] = {}
        self.frozen: dict[int, list[str]] = {}
        self.entries: list[Entry] = []
        self.layers: dict[str, keras.layers.Layer] = {}
        self.reshapes: dict[str, tuple] = {}
        self.nested: dict[str, list] = {}
        self.calls: dict[int, int] = {}

    # ------------------------------------------------------ union-find
    def new_group(self, size: int, origin: str, frozen: str | None = None):
        gid = len(self.parent)
        self.parent[gid] = gid
        self.size[gid] = int(size)
        self.origin[gid] = origin
        self.frozen[gid] = [frozen] if frozen else []
        return ("leaf", gid)

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.frozen[ra] += self.frozen.pop(rb)

    def freeze(self, layout, reason: str) -> None:
        for g in leaves(layout):
            reasons = self.frozen[self.find(g)]
            if reason not in reasons:
                reasons.append(reason)

    def unify(self, a, b) -> bool:
        """Makes two layouts the same channel space; False if impossible."""
        if a[0] == "leaf" and b[0] == "leaf":
            if self.size[self.find(a[1])] != self.size[self.find(b[1])]:
                return False
            self.union(a[1], b[1])
            return True
        same_shape = a[0] == b[0] and (
            (a[0] == "cat" and len(a[1]) == len(b[1]))
            or (a[0] in ("tile", "rep") and a[2] == b[2])
        )
        if not same_shape:
            return False
        if a[0] == "cat":
            sizes = {g: self.size[self.find(g)] for g in leaves(a) + leaves(b)}
            if [layout_size(p, sizes) for p in a[1]] != [
                layout_size(p, sizes) for p in b[1]
            ]:
                return False
            return all(self.unify(x, y) for x, y in zip(a[1], b[1]))
        return self.unify(a[1], b[1])

    # ------------------------------------------------------ entries
    def add(self, layer, lname, var, axis, layout, role, producer=False):
        axis = axis % len(var.shape)
        self.entries.append(
            Entry(layer, lname, var.path, axis, layout, role, producer)
        )

    # ------------------------------------------------------ traversal
    def run_model(self, model, inputs_layouts, prefix: str):
        """Walks `model` given layouts of its inputs; returns output layouts."""
        tensor_layout: dict[int, tuple] = {}
        for t, lay in zip(model.inputs, inputs_layouts):
            tensor_layout[id(t)] = lay
        for node in topological_nodes(model):
            op = node.operation
            ins = node.input_tensors
            lays = [tensor_layout[id(t)] for t in ins]
            outs = self.visit(op, prefix, lays, ins, node.outputs)
            for t, lay in zip(node.outputs, outs):
                tensor_layout[id(t)] = lay
        return [tensor_layout[id(t)] for t in model.outputs]

    def visit(self, op, prefix, lays, ins, outs):
        lname = prefix + op.name
        self.layers[lname] = op
        self.calls[id(op)] = self.calls.get(id(op), 0) + 1
        if self.calls[id(op)] > 1:
            reason = f"layer `{lname}` is shared (called twice)"
            inner = lname + "/"
            used = [e.layout for e in self.entries
                    if e.layer is op or e.lname.startswith(inner)]
            for lay in lays + used:
                self.freeze(lay, reason)
            return [self.new_group(_channels(t), lname, reason) for t in outs]
        if isinstance(op, keras.Model):
            if is_graph_model(op):
                self.nested[lname] = lays
                return self.run_model(op, lays, lname + "/")
            return self.unknown(op, lname, lays, outs, "subclassed model")
        handler = _handler_for(op)
        if handler is None:
            return self.unknown(op, lname, lays, outs, "unsupported layer")
        return handler(self, op, lname, lays, ins, outs)

    def unknown(self, op, lname, lays, outs, why):
        reason = f"{why} `{lname}` ({type(op).__name__})"
        for lay in lays:
            self.freeze(lay, reason)
        return [self.new_group(_channels(t), lname, reason) for t in outs]

    # ------------------------------------------------------ results
    def finish(self, model) -> Analysis:
        for t, lay in zip(model.outputs, self.model_outputs):
            name = t._keras_history.operation.name
            self.freeze(lay, f"reaches model output `{name}`")
        roots = {g: self.find(g) for g in self.parent}
        sizes = {g: self.size[g] for g in self.parent}
        by_root: dict[int, list[Entry]] = {}
        for e in self.entries:
            for g in dict.fromkeys(roots[x] for x in leaves(e.layout)):
                by_root.setdefault(g, []).append(e)
        groups, gid_of, used = [], {}, set()
        for root in sorted(set(roots.values())):
            es = by_root.get(root, [])
            name = _unique(self.origin[root], used)
            members, producers, maps = [], [], {}
            for e in es:
                if e.role != "member":
                    continue
                members.append((e.lname, e.path, e.axis))
                if e.producer:
                    producers.append((e.lname, e.path, e.axis))
                gids, chans = flat_channels(e.layout, sizes)
                chans = np.where(
                    np.array([roots[g] for g in gids]) == root, chans, -1
                )
                if not np.array_equal(chans, np.arange(self.size[root])):
                    maps[e.path] = chans
            consumers = [(e.lname, e.path, e.axis) for e in es
                         if e.role == "consumer"]
            reasons = self.frozen[root]
            if not producers and not reasons:
                reasons = ["has no producer"]
            groups.append(ChannelGroup(
                name=name, size=self.size[root], members=tuple(members),
                consumers=tuple(consumers), producers=tuple(producers),
                prunable=not reasons,
                reason="; ".join(reasons) if reasons else None, maps=maps,
            ))
            gid_of[name] = root
        return Analysis(groups, gid_of, self.entries, self.layers, roots,
                        {r: self.size[r] for r in set(roots.values())},
                        self.reshapes, self.nested)


def _unique(name: str, used: set) -> str:
    out, k = name, 1
    while out in used:
        k += 1
        out = f"{name}#{k}"
    used.add(out)
    return out


def _channels(t) -> int:
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
        if not isinstance(node.operation, L.InputLayer):
            nodes.append(node)
    return nodes


# ---------------------------------------------------------------- handlers
def _h_conv(an, layer, lname, lays, ins, outs):
    (lay,) = lays
    if layer.data_format == "channels_first":
        return an.unknown(layer, lname, lays, outs, "channels_first layer")
    if getattr(layer, "groups", 1) != 1:
        return an.unknown(layer, lname, lays, outs, "grouped convolution")
    rank = len(layer.kernel.shape)
    transpose = isinstance(layer, TRANSPOSE)
    in_axis, out_axis = (rank - 1, rank - 2) if transpose else (rank - 2,
                                                                 rank - 1)
    an.add(layer, lname, layer.kernel, in_axis, lay, "consumer")
    out = an.new_group(layer.filters, lname)
    an.add(layer, lname, layer.kernel, out_axis, out, "member", producer=True)
    if layer.use_bias:
        an.add(layer, lname, layer.bias, 0, out, "member")
    return [out]


def _h_dense(an, layer, lname, lays, ins, outs):
    (lay,) = lays
    an.add(layer, lname, layer.kernel, 0, lay, "consumer")
    out = an.new_group(layer.units, lname)
    an.add(layer, lname, layer.kernel, 1, out, "member", producer=True)
    if layer.use_bias:
        an.add(layer, lname, layer.bias, 0, out, "member")
    return [out]


def _h_separable(an, layer, lname, lays, ins, outs):
    (lay,) = lays
    if layer.data_format == "channels_first":
        return an.unknown(layer, lname, lays, outs, "channels_first layer")
    m = layer.depth_multiplier
    rank = len(layer.depthwise_kernel.shape)
    an.add(layer, lname, layer.depthwise_kernel, rank - 2, lay, "member")
    an.add(layer, lname, layer.pointwise_kernel, rank - 2,
           _rep(lay, m), "consumer")
    out = an.new_group(layer.filters, lname)
    an.add(layer, lname, layer.pointwise_kernel, rank - 1, out, "member",
           producer=True)
    if layer.use_bias:
        an.add(layer, lname, layer.bias, 0, out, "member")
    return [out]


def _h_depthwise(an, layer, lname, lays, ins, outs):
    (lay,) = lays
    if layer.data_format == "channels_first":
        return an.unknown(layer, lname, lays, outs, "channels_first layer")
    rank = len(layer.kernel.shape)
    out = _rep(lay, layer.depth_multiplier)
    an.add(layer, lname, layer.kernel, rank - 2, lay, "member")
    if layer.use_bias:
        an.add(layer, lname, layer.bias, 0, out, "member")
    return [out]


def _rep(layout, m):
    return layout if m == 1 else ("rep", layout, m)


def _h_batchnorm(an, layer, lname, lays, ins, outs):
    (lay,) = lays
    if layer.axis not in (-1, len(ins[0].shape) - 1):
        return an.unknown(layer, lname, lays, outs,
                          "BatchNormalization not over the last axis")
    for v in layer.weights:
        an.add(layer, lname, v, 0, lay, "member")
    return [lay]


def _h_prelu(an, layer, lname, lays, ins, outs):
    (lay,) = lays
    if layer.alpha.shape[-1] not in (1, None) or _channels(ins[0]) == 1:
        an.add(layer, lname, layer.alpha, -1, lay, "member")
    return [lay]


def _h_activation(an, layer, lname, lays, ins, outs):
    name = getattr(layer.activation, "__name__", str(layer.activation))
    if name in _MIXING_ACTIVATIONS:
        return an.unknown(layer, lname, lays, outs, "channel-mixing activation")
    return lays


def _h_softmax(an, layer, lname, lays, ins, outs):
    return an.unknown(layer, lname, lays, outs, "channel-mixing Softmax")


def _h_pass(an, layer, lname, lays, ins, outs):
    if getattr(layer, "data_format", None) == "channels_first":
        return an.unknown(layer, lname, lays, outs, "channels_first layer")
    if isinstance(layer, L.Rescaling) and np.ndim(layer.scale) > 0:
        an.freeze(lays[0], f"per-channel Rescaling `{lname}`")
    return [lays[0]]


def _h_layernorm(an, layer, lname, lays, ins, outs):
    rank = len(ins[0].shape)
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if any(a % rank == rank - 1 for a in axes):
        an.freeze(lays[0], f"LayerNormalization over channels `{lname}`")
    return [lays[0]]


def _h_normalization(an, layer, lname, lays, ins, outs):
    an.freeze(lays[0], f"per-channel Normalization `{lname}`")
    return [lays[0]]


def _h_flatten(an, layer, lname, lays, ins, outs):
    shape = ins[0].shape[1:]
    if any(d is None for d in shape):
        return an.unknown(layer, lname, lays, outs, "dynamic-shape Flatten")
    positions = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return [lays[0] if positions == 1 else ("tile", lays[0], positions)]


def _h_reshape(an, layer, lname, lays, ins, outs):
    src, dst = ins[0].shape[1:], outs[0].shape[1:]
    keeps_channels = (
        len(src) > 0 and len(dst) > 0 and src[-1] == dst[-1]
        and None not in src and None not in dst
        and math.prod(src[:-1]) == math.prod(dst[:-1])
    )
    if not keeps_channels:
        return an.unknown(layer, lname, lays, outs, "unmappable Reshape")
    an.reshapes[lname] = lays[0]
    return [lays[0]]


def _h_merge(an, layer, lname, lays, ins, outs):
    full = [i for i, t in enumerate(ins) if _channels(t) != 1]
    keep = [lays[i] for i in full] or [lays[0]]
    for i in range(len(ins)):
        if i not in full and full:
            an.freeze(lays[i], f"broadcast over channels in `{lname}`")
    for other in keep[1:]:
        if not an.unify(keep[0], other):
            for lay in lays:
                an.freeze(lay, f"mismatched channel structures in `{lname}`")
    return [keep[0]]


def _h_concat(an, layer, lname, lays, ins, outs):
    rank = len(outs[0].shape)
    if layer.axis % rank == rank - 1:
        return [("cat", tuple(lays))]
    return _h_merge(an, layer, lname, lays, ins, outs)


_HANDLERS = [
    (CONV + TRANSPOSE, _h_conv),
    (SEPARABLE, _h_separable),
    (DEPTHWISE, _h_depthwise),
    ((L.Dense,), _h_dense),
    ((L.BatchNormalization,), _h_batchnorm),
    ((L.PReLU,), _h_prelu),
    ((L.Activation,), _h_activation),
    ((L.Softmax,), _h_softmax),
    ((L.LayerNormalization,), _h_layernorm),
    ((L.Normalization,), _h_normalization),
    ((L.Flatten,), _h_flatten),
    ((L.Reshape,), _h_reshape),
    ((L.Concatenate,), _h_concat),
    (_MERGE, _h_merge),
    (_PASS, _h_pass),
]


def _handler_for(op):
    for classes, handler in _HANDLERS:
        if type(op) in classes:
            return handler
    return None


# ---------------------------------------------------------------- public
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


def analyze(model) -> Analysis:
    """Channel analysis of `model` (groups, entries, layouts)."""
    check_functional(model)
    an = _Analyzer()
    in_lays = [
        an.new_group(_channels(t), f"input:{t._keras_history.operation.name}",
                     "model input")
        for t in model.inputs
    ]
    an.model_outputs = an.run_model(model, in_lays, "")
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


def short_name(variable) -> str:
    """A variable's name within its layer (`kernel`, `gamma`, ...)."""
    return variable.path.rsplit("/", 1)[-1]


def get_variable(model, path: str):
    """The variable of `model` whose `.path` is `path`.

    Raises:
        ValueError: no such variable.
    """
    for v in model.weights:
        if v.path == path:
            return v
    raise ValueError(
        f"`model` has no variable with path {path!r}. Was the plan made for "
        "another model?"
    )


def producer_filters(model, group: ChannelGroup) -> np.ndarray:
    """The group's producer filters, one row per channel.

    Each producer kernel is moved to `(channels, -1)` and the producers are
    concatenated along the features.
    """
    rows = [
        np.moveaxis(get_variable(model, path).numpy(), axis, 0).reshape(
            group.size, -1
        )
        for _, path, axis in group.producers
    ]
    return np.concatenate(rows, axis=1)
