"""`slim`: build the narrower functional model a `PruningPlan` describes.

Four steps: *analyse* (the plan's own analysis of the model, or a new one),
*index* (old <-> new entries of every touched channel layout,
`graph.Reindex`), *weights* (every per-channel variable keeps the slice of
each cluster's first member; every consumer sums the input slices of a
cluster's members, which is exact once they are identical, as after C-SGD;
removed input-independent channels fold into the consumer's bias) and
*rebuild* (`keras_csgd.rebuild`, with the registry's narrower configs and
the plan's removed blocks).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import keras
import numpy as np

from keras_csgd import blocks, graph, layers
from keras_csgd.optimizers.spread import cluster_spread
from keras_csgd.plan import PruningPlan
from keras_csgd.rebuild import rebuild, var_key

SPREAD_TOLERANCE = 1e-4


def _bound_plan(plan, model) -> tuple[PruningPlan, graph.Analysis]:
    """`plan` bound to this model's groups (validated), and the analysis."""
    if not isinstance(plan, PruningPlan):
        raise TypeError(
            f"`plan` must be a kc.PruningPlan. Received: plan={plan!r}"
        )
    an = plan.made_for(model) or graph.analyze(model)
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
    return PruningPlan(plan.clusters, groups=an.groups), an


def _probe_inputs(model, layers_, batch: int = 4, seed: int = 0):
    """Input values of `layers_` (top-level, single call) on random inputs."""
    rng = np.random.default_rng(seed)
    feeds = []
    for t in model.inputs:
        shape = [batch] + [d if d is not None else 32 for d in t.shape[1:]]
        feeds.append(rng.normal(size=shape).astype(t.dtype or "float32"))
    probe = keras.Model(model.input, [layer.input for layer in layers_])
    outs = probe(keras.tree.pack_sequence_as(model.input, feeds),
                 training=False)
    if len(layers_) == 1:
        outs = [outs]
    return [keras.ops.convert_to_numpy(o) for o in outs]


def _constant_folds(model, an, index, consumers):
    """Bias increments from removed input-independent channels.

    Returns:
        `{layer_name: delta}`, `delta` over the layer's old output channels.
    """
    cands = []
    for e in consumers:
        layer = an.layers[e.lname]
        handler = layers.handler_for(layer)
        if (
            "/" not in e.lname and handler.fold(layer) == "kernel"
            and getattr(layer, "kernel", None) is not None
            and e.path == layer.kernel.path
            and (index.assign(an.root(e.layout)) < 0).any()
        ):
            cands.append((e, layer))
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


def _check_collapsed(model, plan: PruningPlan, strict: bool) -> None:
    """Warns (or raises) when merged clusters are not identical."""
    if all(len(c) == 1 for cl in plan.clusters.values() for c in cl):
        return
    spread = cluster_spread(model, plan)
    if spread["overall"] <= SPREAD_TOLERANCE:
        return
    worst = max(spread["groups"], key=spread["groups"].get)
    message = (
        "`slim` merges clusters whose channels are not identical: the "
        f"largest relative spread is {spread['overall']:.3g} (group "
        f"{worst!r}; tolerance {SPREAD_TOLERANCE:g}), so the slim model "
        "will not compute what the trained one does. Train longer with "
        "`kc.CSGD` (see `kc.cluster_spread`), or use singleton clusters for "
        "plain pruning."
    )
    if strict:
        raise ValueError(message + " Received: strict=True")
    warnings.warn(message, stacklevel=3)


def slim(model, plan: PruningPlan, remove_blocks: Iterable[str] = (),
         strict: bool = False):
    """Builds the slim functional model of `plan`, with merged weights.

    Each cluster of the plan becomes one channel: every per-channel variable
    keeps the slice of the cluster's first member, and every consumer sums
    the input slices of the cluster's members (through Flatten per position
    block, through Concatenate at shifted ranges). After C-SGD has collapsed
    the clusters this is exact; where clusters have not collapsed
    (`kc.cluster_spread` above 1e-4), `slim` warns, naming the worst group,
    or raises with `strict=True`.

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
        plan: a `PruningPlan` for this model (bound or not). Its own
            `remove_blocks` are removed too.
        remove_blocks: names of two-input `Add` layers whose residual branch
            is dropped: the Add is replaced by its shortcut input (exact when
            the branch outputs zero, e.g. a closed block gate). Defaults to
            `()`.
        strict: raise instead of warning when merged clusters are not
            identical. Defaults to `False`.

    Returns:
        A new, uncompiled `keras.Model` with the same input, output and
        layer names.

    Raises:
        ValueError: the plan does not fit the model (unknown or frozen group,
            sizes differ, index out of range), bad `remove_blocks`, a
            subclassed model, clusters not collapsed with `strict=True`.

    Example:

    ```python
    plan = kc.make_plan(model, keep=0.625)
    model.compile(optimizer=kc.CSGD(plan), loss=...)
    model.fit(...)
    small = kc.slim(model, plan)
    ```
    """
    local, an = _bound_plan(plan, model)
    if isinstance(remove_blocks, str):
        raise TypeError(
            "`remove_blocks` must be a list of Add layer names. "
            f"Received: remove_blocks={remove_blocks!r}"
        )
    shortcuts = blocks.block_shortcuts(
        model, dict.fromkeys([*plan.remove_blocks, *remove_blocks])
    )
    _check_collapsed(model, local, strict)
    index = graph.Reindex(an, local)
    planned = set(index.ids)
    touched = [
        e for e in an.entries
        if planned.intersection(graph.leaves(an.root(e.layout)))
    ]
    folds = _constant_folds(
        model, an, index, [e for e in touched if e.role == "consumer"]
    )
    values = _new_weights(an, index, touched, folds)
    widths = {
        name: {k: graph.layout_size(an.root(lay), index.new)
               for k, lay in keys.items()}
        for name, keys in an.widths.items()
    }

    def configure(name, layer, config):
        if name in widths:
            config = layers.handler_for(layer).rebuild(config, widths[name])
        if name in folds and not layer.use_bias:
            config["use_bias"] = True
        return config

    def call(name, layer, args, kwargs):
        if name in shortcuts:
            return args[0][shortcuts[name]]
        return NotImplemented

    def input_widths(name, source):
        lays = an.nested.get(name) if name else None
        if lays is None:
            return None
        return [graph.layout_size(an.root(lay), index.new) for lay in lays]

    changed = {e.lname for e in touched} | {
        name for name, keys in an.widths.items()
        if any(planned.intersection(graph.leaves(an.root(lay)))
               for lay in keys.values())
    }
    # A narrowed traced layer is built as its graph, and so is every traced
    # layer inside it (no config round trip for keras_hub's classes).
    narrowed = [name for name in an.traced
                if any(c.startswith(name + "/") for c in changed)]
    expand = {
        name: traced for name, traced in an.traced.items()
        if any(name == n or name.startswith(n + "/") for n in narrowed)
    }
    return rebuild(model, configure, call if shortcuts else None, values,
                   input_widths, expand)


def _segment_sum(w, assign, n_new, axis):
    w0 = np.moveaxis(w, axis, 0)
    out = np.zeros((n_new,) + w0.shape[1:], w.dtype)
    keep = assign >= 0
    np.add.at(out, assign[keep], w0[keep])
    return np.moveaxis(out, 0, axis)


def _new_weights(an, index, touched, folds):
    """`{layer_name: {variable key: new value}}` for the touched layers."""
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
        out.setdefault(lname, {})[var_key(layer, var)] = w
    for lname, delta in folds.items():
        layer = an.layers[lname]
        bias = layer.bias.numpy() if layer.use_bias else 0 * delta
        bias = (bias + delta).astype(layer.kernel.dtype)
        (out_layout,) = [e.layout for e in an.entries_of(lname) if e.producer]
        bias = np.take(bias, index.select(an.root(out_layout)))
        out.setdefault(lname, {})["bias"] = bias
    return out
