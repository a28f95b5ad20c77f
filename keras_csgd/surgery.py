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

import functools
import warnings
from collections.abc import Iterable

import keras
import numpy as np

from keras_csgd import blocks, graph, layers, llm
from keras_csgd.optimizers.spread import cluster_spread
from keras_csgd.plan import PruningPlan
from keras_csgd.rebuild import rebuild, var_key, with_bias
from keras_csgd.saving import saves

SPREAD_TOLERANCE = 1e-4
BLOCK_TOLERANCE = 1e-4  # largest branch / shortcut RMS of a removed block


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


def _random_inputs(model, batch: int = 4, seed: int = 0):
    """A batch of standard normal model inputs (unknown sizes: 32); integer
    inputs (token ids, masks) get 0 or 1."""
    rng = np.random.default_rng(seed)
    feeds = []
    for t in model.inputs:
        shape = [batch] + [d if d is not None else 32 for d in t.shape[1:]]
        dtype = np.dtype(t.dtype or "float32")
        feeds.append(rng.integers(0, 2, shape).astype(dtype)
                     if dtype.kind in "iu" else
                     rng.normal(size=shape).astype(dtype))
    return keras.tree.pack_sequence_as(model.input, feeds)


def _probe_inputs(model, layers_, inputs=None):
    """Input values of `layers_` (top-level, single call) on `inputs`
    (default: random inputs)."""
    probe = keras.Model(model.input, [layer.input for layer in layers_])
    if inputs is None:
        inputs = _random_inputs(model)
    outs = probe(inputs, training=False)
    if len(layers_) == 1:
        outs = [outs]
    return [keras.ops.convert_to_numpy(o) for o in outs]


def _constant_folds(model, an, index, consumers, inputs=None):
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
    values = _probe_inputs(model, [layer for _, layer in cands], inputs)
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


def _check_dead(model, names, inputs, strict: bool) -> None:
    """Warns (or raises) when a removed block's branch is not zero."""
    if not names:
        return
    if inputs is None:
        inputs = _random_inputs(model)
    live = blocks.branch_contributions(model, names, inputs)
    worst = max(live, key=live.get)
    if live[worst] <= BLOCK_TOLERANCE:
        return
    message = (
        "`slim` removes residual blocks whose branches are not zero: the "
        f"largest branch / shortcut RMS ratio is {live[worst]:.3g} (block "
        f"{worst!r}; tolerance {BLOCK_TOLERANCE:g}), so the slim model "
        "will not compute what the trained one does. Train with `kc.CSGD` "
        "or `AsymptoticSoftFilterPruning.from_plan` (they drive removed "
        "blocks to zero), or recover the slim model by fine-tuning "
        "(`kc.fine_tune`)."
    )
    if strict:
        raise ValueError(message + " Received: strict=True")
    warnings.warn(message, stacklevel=3)


def slim(model, plan: PruningPlan, remove_blocks: Iterable[str] = (),
         strict: bool = False, inputs=None, check: bool = True):
    """Builds the slim functional model of `plan`, with merged weights.

    Each cluster of the plan becomes one channel: every per-channel variable
    keeps the slice of the cluster's first member, and every consumer sums
    the input slices of the cluster's members (through Flatten per position
    block, through Concatenate at shifted ranges). After C-SGD has collapsed
    the clusters this is exact; where clusters have not collapsed
    (`kc.cluster_spread` above 1e-4), `slim` warns, naming the worst group,
    or raises with `strict=True`. Likewise for removed residual blocks: each
    branch's output is compared with its shortcut's on `inputs` (RMS
    ratio; `kc.CSGD` and ASFP drive a planned block's branch to exactly 0),
    and a live branch warns, naming the worst block, or raises.

    A `LayerNormalization` or `RMSNormalization` over merged channels is
    rebuilt as a `ClusterNormalization` that weighs each channel by the
    size of its cluster, so that its statistics, and the merge, stay exact.
    Over removed channels, a normalization takes its statistics over the
    kept ones (plain pruning, to be fine-tuned).

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
            identical or a removed block's branch is not zero. Defaults to
            `False`.
        inputs: a batch of model inputs on which removed blocks are
            checked and removed channels found constant. Defaults to
            `None` (4 standard normal inputs, unknown sizes 32, integer
            inputs 0 or 1).
        check: check merged clusters and removed blocks, and rebuild a
            keras_hub decoder backbone as its own class; `False` for a
            slim model wanted for its structure alone (latency profiling:
            the functional model, which computes the same). Defaults to
            `True`.

    Returns:
        A new, uncompiled `keras.Model` with the same input, output and
        layer names: a functional model, or, for a keras_hub decoder
        backbone whose decoder layers keep equal widths, a backbone of its
        own class (`keras_csgd.llm`), which its CausalLM can wrap.

    Raises:
        ValueError: the plan does not fit the model (unknown or frozen group,
            sizes differ, index out of range), bad `remove_blocks`, a
            subclassed model, clusters not collapsed or removed blocks not
            dead with `strict=True`.

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
    if check:
        _check_collapsed(model, local, strict)
        _check_dead(model, list(shortcuts), inputs, strict)
    index = graph.Reindex(an, local)
    planned = set(index.ids)
    touched = [
        e for e in an.entries
        if planned.intersection(graph.leaves(an.root(e.layout)))
    ]
    folds = _constant_folds(
        model, an, index, [e for e in touched if e.role == "consumer"],
        inputs)
    values = _new_weights(an, index, touched, folds)
    _absorb_sizes(an, index, planned, values)
    widths = {
        name: {k: graph.layout_size(an.root(lay), index.new)
               for k, lay in keys.items()}
        for name, keys in an.widths.items()
        if layers.attribute(an.layers[name], "replaces")
        or any(planned.intersection(graph.leaves(an.root(lay)))
               for lay in keys.values())
    }

    for name, counts in _merged_counts(an, index, planned).items():
        widths.setdefault(name, {})["counts"] = counts

    def configure(name, layer, config):
        if name in folds and not layer.use_bias:
            config = with_bias(layer, config)
        if name in widths:
            config = layers.handler_for(layer).rebuild(config, widths[name])
        return config

    def call(name, layer, args, kwargs):
        if name in shortcuts:
            return args[0][shortcuts[name]]
        return NotImplemented

    def input_widths(name, source):
        inputs = an.nested.get(name) if name else None
        if inputs is None:
            return None
        return [tuple(None if lay is None else graph.layout_size(
            an.root(lay), index.new) for lay in axes) for axes in inputs]

    changed = {e.lname for e in touched} | {
        name for name, keys in an.widths.items()
        if any(planned.intersection(graph.leaves(an.root(lay)))
               for lay in keys.values())
    }
    # A narrowed traced layer is built as its graph, and so is every traced
    # layer inside it (no config round trip for keras_hub's classes), and
    # one whose copy would not save (with the traced layers around it).
    narrowed = [name for name in an.traced
                if any(c.startswith(name + "/") for c in changed)]
    unsaved = [name for name in an.traced if not saves(an.layers[name])]
    expand = {
        name: traced for name, traced in an.traced.items()
        if any(name == n or name.startswith(n + "/") for n in narrowed)
        or any(n == name or n.startswith(name + "/") for n in unsaved)
    }
    edits = {n: functools.partial(configure, n) for n in {*widths, *folds}}
    built = rebuild(model, edits, call if shortcuts else None, values,
                    input_widths, expand)
    return llm.own_class(model, built) if check else built


def _absorb_sizes(an, index, planned, values) -> None:
    """Multiplies the output of each normalization that a tied output
    projection alone reads (`graph.Context.absorbs`) by its clusters' sizes
    in `values`: the projection's table serves the embedding too, so it
    keeps each cluster's column, and the norm gives it the cluster's sum
    (its channels, collapsed, are equal)."""
    for name, lay in an.absorbing.items():
        lay = an.root(lay)
        if not planned.intersection(graph.leaves(lay)):
            continue
        layer = an.layers[name]
        gain, offset = layers.handler_for(layer).gain(layer)
        assign = index.assign(lay)
        sizes = np.bincount(assign[assign >= 0],
                            minlength=graph.layout_size(lay, index.new))
        new = values[name]
        for key, w in new.items():
            shift = offset if key == var_key(layer, gain) else 0.0
            new[key] = ((shift + w) * sizes - shift).astype(w.dtype)


def _merged_counts(an, index, planned) -> dict[str, np.ndarray]:
    """How many original channels each channel of a weighing
    normalization stands for (`graph.Context.weighs`), where it is not one
    each: `{layer: counts}`, handed to their handler's `rebuild` as the
    width `counts`."""
    out = {}
    for name, lay in an.weighed.items():
        lay = an.root(lay)
        if not planned.intersection(graph.leaves(lay)):
            continue
        layer = an.layers[name]
        own = layers.handler_for(layer).counts(layer)
        assign = index.assign(lay)
        kept = assign >= 0
        weights = np.ones(len(assign)) if own is None else own
        new = np.bincount(assign[kept], weights=weights[kept],
                          minlength=graph.layout_size(lay, index.new))
        if own is not None or (new != 1).any():
            out[name] = np.rint(new).astype(np.int64)
    return out


def _segment_sum(w, assign, n_new, axis):
    """`w`'s slices along `axis` summed into `n_new` by `assign` (-1:
    dropped)."""
    w0 = np.moveaxis(w, axis, 0)
    out = np.zeros((n_new,) + w0.shape[1:], w.dtype)
    keep = np.flatnonzero(assign >= 0)
    order = keep[np.argsort(assign[keep], kind="stable")]
    if len(order):
        ids = assign[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        out[ids[starts]] = np.add.reduceat(w0[order], starts, axis=0)
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
