"""`slim`: build the narrower functional model a `PruningPlan` describes.

The model is cloned (`keras.models.clone_model`) with smaller `filters` /
`units`; every per-channel variable keeps the slice of each cluster's first
member; every consumer sums the input slices of a cluster's members (once the
members are identical, as after C-SGD, this is exact). Removed channels whose
value does not depend on the input (a zeroed filter followed by BN emits the
constant `beta - gamma * mean / sqrt(var + eps)`) are folded into the
consumer's bias.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np

from keras_csgd import graph
from keras_csgd.plan import PruningPlan

L = keras.layers
_WIDTH_KEY = {L.Dense: "units"}
_FOLDABLE = graph.CONV + (L.Dense,)


class _Index:
    """Old <-> new entry indices of channel layouts under a plan."""

    def __init__(self, an: graph.Analysis, plan: PruningPlan):
        self.old = dict(an.sizes)
        self.new = dict(an.sizes)
        self.ids, self.first = {}, {}
        for name, clusters in plan.clusters.items():
            root = an.gid_of[name]
            self.new[root] = len(clusters)
            self.ids[root] = plan.cluster_ids(name, an.sizes[root])
            self.first[root] = np.array([c[0] for c in clusters])

    def select(self, lay) -> np.ndarray:
        """For every new entry, the old entry it copies."""
        kind = lay[0]
        if kind == "leaf":
            r = lay[1]
            return self.first.get(r, np.arange(self.old[r]))
        if kind == "cat":
            out, off = [], 0
            for part in lay[1]:
                out.append(self.select(part) + off)
                off += graph.layout_size(part, self.old)
            return np.concatenate(out)
        inner, t = self.select(lay[1]), lay[2]
        n = graph.layout_size(lay[1], self.old)
        if kind == "tile":
            return np.concatenate([inner + p * n for p in range(t)])
        return (inner[:, None] * t + np.arange(t)).ravel()

    def assign(self, lay) -> np.ndarray:
        """For every old entry, the new entry it adds into (-1: removed)."""
        kind = lay[0]
        if kind == "leaf":
            r = lay[1]
            return self.ids.get(r, np.arange(self.old[r]))
        if kind == "cat":
            out, off = [], 0
            for part in lay[1]:
                a = self.assign(part)
                out.append(np.where(a >= 0, a + off, -1))
                off += graph.layout_size(part, self.new)
            return np.concatenate(out)
        inner, t = self.assign(lay[1]), lay[2]
        n = graph.layout_size(lay[1], self.new)
        if kind == "tile":
            return np.concatenate(
                [np.where(inner >= 0, inner + p * n, -1) for p in range(t)]
            )
        rep = np.repeat(inner, t)
        sub = np.tile(np.arange(t), len(inner))
        return np.where(rep >= 0, rep * t + sub, -1)


def _segment_sum(w, assign, n_new, axis):
    w0 = np.moveaxis(w, axis, 0)
    out = np.zeros((n_new,) + w0.shape[1:], w.dtype)
    keep = assign >= 0
    np.add.at(out, assign[keep], w0[keep])
    return np.moveaxis(out, 0, axis)


def _bound_plan(plan, an: graph.Analysis) -> PruningPlan:
    """A copy of `plan` bound to this model's groups (validated)."""
    if not isinstance(plan, PruningPlan):
        raise TypeError(
            f"`plan` must be a kc.PruningPlan. Received: plan={plan!r}"
        )
    if plan.groups is not None:
        sizes = {g.name: g.size for g in an.groups}
        diff = [
            f"{n} ({g.size} vs {sizes[n]})"
            for n, g in plan.groups.items()
            if n in sizes and g.size != sizes[n]
        ]
        if diff:
            raise ValueError(
                "The plan was made for another model: group sizes differ "
                f"(plan vs model): {', '.join(diff)}"
            )
    local = PruningPlan(plan.clusters, groups=an.groups)
    return local


def _probe_inputs(model, layers, batch: int = 4, seed: int = 0):
    """Input values of `layers` (top-level, single call) on random inputs."""
    rng = np.random.default_rng(seed)
    feeds = []
    for t in model.inputs:
        shape = [batch] + [d if d is not None else 32 for d in t.shape[1:]]
        feeds.append(rng.normal(size=shape).astype(t.dtype or "float32"))
    probe = keras.Model(model.input, [layer.input for layer in layers])
    outs = probe(keras.tree.pack_sequence_as(model.input, feeds),
                 training=False)
    if len(layers) == 1:
        outs = [outs]
    return [keras.ops.convert_to_numpy(o) for o in outs]


def _constant_folds(model, an, index, consumers):
    """Bias increments from removed input-independent channels.

    Returns:
        `{layer_name: delta}`, `delta` over the layer's old output channels.
    """
    cands = [
        (e, an.layers[e.lname]) for e in consumers
        if "/" not in e.lname and isinstance(an.layers[e.lname], _FOLDABLE)
        and (index.assign(an.root(e.layout)) < 0).any()
    ]
    if not cands:
        return {}
    values = _probe_inputs(model, [layer for _, layer in cands])
    folds = {}
    for (e, layer), x in zip(cands, values):
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        mean, std = x.mean(0), x.std(0)
        removed = index.assign(an.root(e.layout)) < 0
        const = removed & (std <= 1e-6 * (1 + np.abs(mean)))
        if not const.any():
            continue
        kernel = layer.kernel.numpy().astype(np.float64)
        taps = kernel.reshape(-1, *kernel.shape[-2:]).sum(0)  # (in, out)
        folds[e.lname] = mean[const] @ taps[const]
    return folds


def block_shortcuts(model, names: Iterable[str]) -> dict[str, int]:
    """For each named two-input Add, the index of its shortcut input.

    The shortcut is the input that is an ancestor of the other (identity
    shortcut), else the one with fewer operations since the inputs' last
    common ancestor (projection shortcut).
    """
    layers = {layer.name: layer for layer in model.layers}
    out = {}
    for name in names:
        layer = layers.get(name)
        if not isinstance(layer, L.Add) or len(layer._inbound_nodes) != 1:
            raise ValueError(
                "`remove_blocks` must name top-level two-input Add layers "
                f"of the model. Received: {name!r}"
            )
        ins = layer._inbound_nodes[0].input_tensors
        if len(ins) != 2:
            raise ValueError(
                f"`remove_blocks`: Add layer {name!r} has {len(ins)} inputs;"
                " a residual block has two."
            )
        anc = [ancestors(t) for t in ins]
        if id(ins[0]) in anc[1]:
            out[name] = 0
        elif id(ins[1]) in anc[0]:
            out[name] = 1
        else:
            common = anc[0] & anc[1]
            out[name] = int(len(anc[1] - common) < len(anc[0] - common))
    return out


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


def slim(model, plan: PruningPlan, remove_blocks: Iterable[str] = ()):
    """Builds the slim functional model of `plan`, with merged weights.

    Each cluster of the plan becomes one channel: every per-channel variable
    keeps the slice of the cluster's first member, and every consumer sums
    the input slices of the cluster's members (through Flatten per position
    block, through Concatenate at shifted ranges). After C-SGD has collapsed
    the clusters this is exact.

    A removed channel whose value does not depend on the input (its producer
    kernels are zero, as after ASFP; BN then emits
    `beta - gamma * mean / sqrt(var + eps)`) is folded into the bias of each
    top-level Conv/Dense consumer (a bias is created where absent). This is
    exact for Dense, 1x1 convolutions and consumers behind global pooling;
    for a k x k convolution with zero padding, border outputs see zeros
    where the removed channel held its constant, so they differ by at most
    `|constant| * sum(|border taps|)`. Other removed channels are dropped.

    Args:
        model: a functional or Sequential `keras.Model`.
        plan: a `PruningPlan` for this model (bound or not).
        remove_blocks: names of two-input `Add` layers whose residual branch
            is dropped: the Add is replaced by its shortcut input (exact when
            the branch outputs zero, e.g. a closed block gate). Defaults to
            `()`.

    Returns:
        A new, uncompiled `keras.Model` with the same input, output and
        layer names.

    Raises:
        ValueError: the plan does not fit the model (unknown or frozen group,
            sizes differ, index out of range), bad `remove_blocks`, a
            subclassed model.

    Example:

    ```python
    plan = kc.make_plan(model, keep=0.625)
    model.compile(optimizer=kc.CSGD(plan), loss=...)
    model.fit(...)
    small = kc.slim(model, plan)
    ```
    """
    an = graph.analyze(model)
    local = _bound_plan(plan, an)
    shortcuts = block_shortcuts(model, remove_blocks)
    index = _Index(an, local)
    planned = set(index.ids)
    touched = [
        e for e in an.entries
        if planned.intersection(graph.leaves(an.root(e.layout)))
    ]
    folds = _constant_folds(
        model, an, index, [e for e in touched if e.role == "consumer"]
    )
    new_values = _new_weights(an, index, touched, folds)
    lname_of = {id(layer): name for name, layer in an.layers.items()}
    clones = {}

    def clone_function(layer):
        name = lname_of.get(id(layer))
        if name in an.nested:
            return clone(layer, [
                graph.layout_size(an.root(lay), index.new)
                for lay in an.nested[name]
            ])
        config = layer.get_config()
        for e in touched:
            if e.producer and e.lname == name:
                key = _WIDTH_KEY.get(type(layer), "filters")
                config[key] = index.new[an.root(e.layout)[1]]
        if name in an.reshapes:
            width = graph.layout_size(an.root(an.reshapes[name]), index.new)
            config["target_shape"] = (*config["target_shape"][:-1], width)
        if name in folds and not layer.use_bias:
            config["use_bias"] = True
        new = layer.__class__.from_config(config)
        clones[name] = new
        return new

    kwargs = {}
    if shortcuts:
        def call_function(layer, *args, **kw):
            if layer.name in shortcuts and clones.get(layer.name) is layer:
                return args[0][shortcuts[layer.name]]
            return layer(*args, **kw)

        kwargs["call_function"] = call_function

    def clone(source, widths):
        tensors = [
            keras.Input((*t.shape[1:-1], w), dtype=t.dtype,
                        name=t._keras_history.operation.name)
            for t, w in zip(source.inputs, widths)
        ]
        if isinstance(source, keras.Sequential):
            return keras.models.clone_model(
                source, tensors[0], clone_function=clone_function
            )
        input_tensors = keras.tree.pack_sequence_as(source.input, tensors)
        return keras.models.clone_model(
            source, input_tensors, clone_function=clone_function, **kwargs
        )

    # The slim model comes back uncompiled: the source's optimizer (C-SGD
    # with its plan, say) does not fit the new variables.
    compiled, model.compiled = model.compiled, False
    try:
        new_model = clone(model, [t.shape[-1] for t in model.inputs])
    finally:
        model.compiled = compiled
    for name, new in clones.items():
        old = an.layers[name]
        if not getattr(new, "weights", None):
            continue
        values = new_values.get(name, {})
        if len(new.weights) == len(old.weights):
            pairs = zip(new.weights, old.weights)
        else:  # a bias was created: match by name
            pairs = [(v, _by_name(old.weights, v)) for v in new.weights]
        new.set_weights([
            values[name] if (name := graph.short_name(v)) in values
            else w.numpy()
            for v, w in pairs
        ])
    return new_model


def _by_name(weights, v):
    name = graph.short_name(v)
    return next((w for w in weights if graph.short_name(w) == name), None)


def _new_weights(an, index, touched, folds):
    """`{layer_name: {variable_name: new value}}` for the touched layers."""
    by_var: dict[tuple[str, str], list] = {}
    for e in touched:
        by_var.setdefault((e.lname, e.path), []).append(e)
    out: dict[str, dict[str, np.ndarray]] = {}
    for (lname, path), es in by_var.items():
        layer = an.layers[lname]
        var = next(v for v in layer.weights if v.path == path)
        w = var.numpy()
        for e in es:
            lay = an.root(e.layout)
            if e.role == "member":
                w = np.take(w, index.select(lay), axis=e.axis)
            else:
                n_new = graph.layout_size(lay, index.new)
                w = _segment_sum(w, index.assign(lay), n_new, e.axis)
        out.setdefault(lname, {})[graph.short_name(var)] = w
    for lname, delta in folds.items():
        layer = an.layers[lname]
        bias = layer.bias.numpy() if layer.use_bias else 0 * delta
        bias = (bias + delta).astype(layer.kernel.dtype)
        (out_layout,) = [
            e.layout for e in an.entries if e.lname == lname and e.producer
        ]
        bias = np.take(bias, index.select(an.root(out_layout)))
        out.setdefault(lname, {})["bias"] = bias
    return out
