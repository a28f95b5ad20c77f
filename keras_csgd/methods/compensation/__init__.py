"""Pruning with compensation (CaP): least-squares repair of the consumers.

When input channels of a consumer layer (a convolution or dense layer) are
removed, the consumer's own weights can absorb most of the loss: from a
little data, collect the mean `mu` and covariance `Sigma` of the consumer's
input *patch vectors* (the `kh * kw * in` entries one output position reads,
in the kernel's `(kh, kw, in)` order), and replace the weights `W` (rows =
output channels) by the closed-form least-squares fit on the kept entries
`s`:

```
W_new = W Sigma[:, s] Sigma[s, s]^-1
b_new = b + W mu - W_new mu[s]
```

`cap_rank` orders the channels greedily by how much of the consumer's output
they explain after compensation, and `structural_search` picks each group's
sparsity by a binary search under a linearly falling accuracy floor.

Typical use:

```python
stats = compensation.collect_statistics(model, x_calib)
slim = compensation.compensate(model, plan, stats)
plan, slim = compensation.structural_search(
    model, x_calib, evaluate, acc_start=0.92, acc_end=0.90
)
```

References:
    Xie et al., "Pruning with Compensation: Efficient Channel Pruning for
    Deep Convolutional Neural Networks", arXiv 2108.13728.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import keras
import numpy as np
import scipy.linalg

from keras_csgd import checks, graph, layers
from keras_csgd.batches import input_batches, num_batches
from keras_csgd.plan import PruningPlan
from keras_csgd.rebuild import rebuild
from keras_csgd.surgery import slim


@dataclasses.dataclass(frozen=True)
class Stats:
    """Input statistics of one consumer layer, in float64.

    Attributes:
        mean: `(d,)` mean of the input patch vectors.
        cov: `(d, d)` covariance of the input patch vectors, normalised by
            `count` (the population covariance).
        count: number of patch vectors seen (batch x output positions).
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int


class _Moments:
    """Running mean and scatter matrix, merged batch by batch (Chan et al.)."""

    def __init__(self, d: int):
        self.n = 0
        self.mean = np.zeros(d)
        self.scatter = np.zeros((d, d))

    def update(self, x: np.ndarray) -> None:
        m = x.shape[0]
        if m == 0:
            return
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        delta = batch_mean - self.mean
        total = self.n + m
        self.scatter += centred.T @ centred
        self.scatter += np.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total

    def stats(self) -> Stats:
        return Stats(self.mean.copy(), self.scatter / self.n, self.n)


# ------------------------------------------------------------------ patches
def _patches(x, layer) -> np.ndarray:
    """The layer's input patch vectors as a float64 `(N, d)` array.

    A convolution's patches are extracted by a convolution with an identity
    kernel, which follows the layer's strides, padding and dilation and
    flattens each patch exactly like `kernel.reshape(-1, filters)`.
    """
    if layers.handler_for(layer).patches == "dense":
        x = keras.ops.convert_to_numpy(x)
        return x.reshape(-1, x.shape[-1]).astype(np.float64)
    size = tuple(layer.kernel_size)
    channels = int(x.shape[-1])
    d = math.prod(size) * channels
    eye = keras.ops.eye(d, dtype=x.dtype)
    eye = keras.ops.reshape(eye, size + (channels, d))
    padding = layer.padding
    if padding == "causal":
        left = layer.dilation_rate[0] * (size[0] - 1)
        x = keras.ops.pad(x, [[0, 0], [left, 0], [0, 0]])
        padding = "valid"
    p = keras.ops.conv(
        x,
        eye,
        strides=layer.strides,
        padding=padding,
        dilation_rate=layer.dilation_rate,
    )
    return keras.ops.convert_to_numpy(p).reshape(-1, d).astype(np.float64)


def _supported(layer) -> bool:
    """Whether statistics of `layer`'s input can be collected and used."""
    return (
        layers.attribute(layer, "patches")
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and getattr(layer, "groups", 1) == 1
    )


def _default_layers(model) -> list[str]:
    """Consumers of the prunable groups that compensation supports."""
    names = []
    for g in graph.channel_groups(model):
        if not g.prunable:
            continue
        for lname, _, _ in g.consumers:
            if lname in names or "/" in lname:
                continue
            if _supported(model.get_layer(lname)):
                names.append(lname)
    return names


def _check_layer(model, name: str):
    try:
        layer = model.get_layer(name)
    except ValueError as e:
        raise ValueError(
            "`layers` must name top-level layers of `model`. "
            f"Received: layers=[..., {name!r}, ...]"
        ) from e
    if not _supported(layer):
        raise ValueError(
            "`layers` must name Conv1D, Conv2D or Dense layers (channels "
            f"last, not grouped). Received: {name!r} ({type(layer).__name__})"
        )
    return layer


def collect_statistics(
    model, data, layers=None, max_batches=None, verbose=1, batch_size=64
):
    """Mean and covariance of the input patch vectors of consumer layers.

    For a `Conv1D`/`Conv2D` layer a patch vector is the `kh * kw * in`
    input entries one output position reads, in the order of
    `kernel.reshape(-1, filters)` (the layer's strides, padding and
    dilation apply; zero padding counts as input). For a `Dense` layer it is
    the input vector (after a `Flatten`, the flattened feature map; for
    inputs of rank > 2, every vector along the last axis). Moments are
    accumulated batch by batch in float64.

    Args:
        model: a functional or Sequential `keras.Model`.
        data: inputs in any form `keras_csgd.batches` reads: a NumPy array,
            an `(x, y)` tuple, a `tf.data.Dataset` of `x` or `(x, y, ...)`
            batches, an `.npz` or an image folder.
        layers: names of the consumer layers to measure. Defaults to `None`:
            every Conv1D, Conv2D and Dense consumer of every prunable
            channel group of `model`.
        max_batches: stop after this many batches. Defaults to `None` (all).
        verbose: `0` silent, `1` progress bar. Defaults to `1`.
        batch_size: batch size for a NumPy `data`. Defaults to `64`.

    Returns:
        A dict `{layer_name: Stats}`.

    Raises:
        ValueError: for a layer that is not a top-level channels-last
            (not grouped) Conv1D, Conv2D or Dense layer of `model`, or for
            empty `data`.

    Example:

    ```python
    stats = compensation.collect_statistics(model, x_train[:2000])
    stats["dense"].mean.shape  # (in_features,)
    ```
    """
    graph.check_functional(model)
    names = _default_layers(model) if layers is None else list(layers)
    chosen = [_check_layer(model, n) for n in names]
    if not chosen:
        return {}
    inputs = model.inputs if len(model.inputs) > 1 else model.inputs[0]
    features = keras.Model(inputs, [layer.input for layer in chosen])
    moments = [None] * len(chosen)
    bar = keras.utils.Progbar(
        num_batches(data, batch_size, max_batches),
        verbose=verbose,
        unit_name="batch",
    )
    seen = 0
    for x in input_batches(data, batch_size):
        if max_batches is not None and seen >= max_batches:
            break
        outs = features(x, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for i, (layer, out) in enumerate(zip(chosen, outs, strict=True)):
            p = _patches(out, layer)
            if moments[i] is None:
                moments[i] = _Moments(p.shape[1])
            moments[i].update(p)
        seen += 1
        bar.update(seen)
    if seen == 0:
        raise ValueError("`data` yielded no batches.")
    return {n: m.stats() for n, m in zip(names, moments, strict=True)}


# ------------------------------------------------------------------ algebra
def _ridge(cov: np.ndarray, ridge: float) -> float:
    """Absolute ridge: `ridge` times the mean variance (1 if all are 0)."""
    scale = float(np.mean(np.diag(cov))) if cov.size else 0.0
    return ridge * (scale if scale > 0 else 1.0)


def _spd_solve(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """`(a + eps I)^-1 b` for a covariance block `a`, by Cholesky."""
    a = a + eps * np.eye(len(a))
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), b)


def _least_squares(stats: Stats, kernel: np.ndarray, kept: np.ndarray, ridge):
    """Compensated kernel rows on `kept` entries and the bias change.

    With Keras kernels `K = W^T` of shape `(d, out)`:
    `K_new = Sigma[s, s]^-1 Sigma[s, :] K` and
    `delta_b = mu K - mu[s] K_new`.
    """
    cov = stats.cov
    eps = _ridge(cov, ridge)
    k_new = _spd_solve(cov[np.ix_(kept, kept)], cov[kept] @ kernel, eps)
    delta = stats.mean @ kernel - stats.mean[kept] @ k_new
    return k_new, delta


def _per_entry(kernel_shape, values) -> np.ndarray:
    """Per-input-channel `values` repeated for every patch entry.

    A kernel `(*window, in, out)` reads its patch entries in the order
    `(*window, in)`, so entry `e` belongs to input channel `e % in`.
    """
    return np.tile(np.asarray(values), math.prod(kernel_shape[:-2]))


def cap_rank(stats, kernel, channels=None, ridge=1e-8):
    """Ranks input channels by compensation-aware greedy forward selection.

    Starting from the entries that are not candidates (channel `-1`), each
    step adds the channel whose entries most reduce the reconstruction loss
    left after least-squares compensation,

    ```
    loss(S) = tr(W Sigma W^T) - tr(B^T A^-1 B),
    A = Sigma[S, S],  B = Sigma[S, :] W^T,
    ```

    i.e. `tr(W R_S W^T)` with `R_S` the Schur complement (the covariance
    left after conditioning on the entries `S`). The gain of a channel `c`
    is `tr(G^T R_cc^-1 G)` with `G = R[c, :] W^T`, and `R` is updated by the
    block Schur step `R -= R[:, c] R_cc^-1 R[c, :]`. With several consumers
    of one channel group, the gains add up.

    Args:
        stats: the consumer's `Stats` (from `collect_statistics`), or a
            list of them (one per consumer of a channel group).
        kernel: the consumer's Keras kernel, `(*window, in, out)` for a
            convolution, `(in, out)` for a dense layer (a list, with a list
            of `stats`).
        channels: the channel each input entry (along the kernel's `in`
            axis) belongs to, `-1` for entries that are always kept (other
            channel groups); a list, with a list of `stats`. Defaults to
            `None`: entry `i` is channel `i`.
        ridge: ridge added to each solved covariance block, relative to
            the mean input variance. Defaults to `1e-8`.

    Returns:
        An int array of the candidate channels, the most important first.

    Raises:
        ValueError: if the lengths of `stats`, `kernel` and `channels`
            differ, or a kernel does not fit its statistics.

    Example:

    ```python
    stats = compensation.collect_statistics(model, x, layers=["conv2"])
    order = compensation.cap_rank(
        stats["conv2"], model.get_layer("conv2").kernel.numpy()
    )
    keep = sorted(order[:8])
    ```

    References:
        Xie et al., arXiv 2108.13728, section 3.2 (compensation-aware
        pruning).
    """
    single = isinstance(stats, Stats)
    stats_l = [stats] if single else list(stats)
    kernels = [kernel] if single else list(kernel)
    if channels is None:
        chans_l = [None] * len(stats_l)
    else:
        chans_l = [channels] if single else list(channels)
    if not len(stats_l) == len(kernels) == len(chans_l):
        raise ValueError(
            "`stats`, `kernel` and `channels` must have one entry per "
            f"consumer. Received: {len(stats_l)} stats, {len(kernels)} "
            f"kernels, {len(chans_l)} channel maps"
        )
    problems = []
    for st, k, ch in zip(stats_l, kernels, chans_l, strict=True):
        k = np.asarray(k, dtype=np.float64)
        if ch is None:
            ch = np.arange(k.shape[-2])
        entries = _per_entry(k.shape, ch)
        k = k.reshape(-1, k.shape[-1])
        if k.shape[0] != len(st.mean) or len(entries) != len(st.mean):
            raise ValueError(
                "`kernel` does not fit `stats`: the kernel reads "
                f"{k.shape[0]} entries, the statistics have "
                f"{len(st.mean)}. Received: kernel.shape={k.shape}"
            )
        eps = _ridge(st.cov, ridge)
        residual = st.cov.copy()
        fixed = np.flatnonzero(entries < 0)
        if len(fixed):
            residual = _schur_step(residual, fixed, eps)
        problems.append((residual, k, entries, eps))
    candidates = sorted(
        set().union(*(set(p[2][p[2] >= 0].tolist()) for p in problems))
    )
    order = []
    while candidates:
        gains = np.zeros(len(candidates))
        for residual, k, entries, eps in problems:
            explained = residual @ k
            for j, c in enumerate(candidates):
                idx = np.flatnonzero(entries == c)
                if len(idx) == 0:
                    continue
                g = explained[idx]
                a = residual[np.ix_(idx, idx)]
                gains[j] += np.sum(g * _spd_solve(a, g, eps))
        best = candidates.pop(int(np.argmax(gains)))
        order.append(best)
        for i, (residual, k, entries, eps) in enumerate(problems):
            idx = np.flatnonzero(entries == best)
            if len(idx):
                residual = _schur_step(residual, idx, eps)
                problems[i] = (residual, k, entries, eps)
    return np.asarray(order, dtype=np.int64)


def _schur_step(r: np.ndarray, idx: np.ndarray, eps: float) -> np.ndarray:
    """`R - R[:, idx] (R[idx, idx] + eps I)^-1 R[idx, :]`."""
    cols = r[:, idx]
    return r - cols @ _spd_solve(r[np.ix_(idx, idx)], cols.T, eps)


# ------------------------------------------------------------------ compensate
def _removed_inputs(analysis, kept_plan) -> dict[str, np.ndarray]:
    """`{consumer_name: removed mask along its kernel's input axis}`."""
    removed = {
        analysis.gid_of[name]: kept_plan.cluster_ids(name) < 0
        for name in kept_plan.clusters
    }
    out = {}
    for e, gids, chans in analysis.consumer_maps():
        mask = np.zeros(len(gids), dtype=bool)
        for root, rem in removed.items():
            sel = gids == root
            mask[sel] = rem[chans[sel]]
        if mask.any():
            out[e.lname] = mask
    return out


def compensate(model, plan, stats, ridge=1e-8):
    """Slims `model` by `plan` and refits each consumer by least squares.

    Every Conv1D/Conv2D/Dense consumer of a pruned channel with statistics
    in `stats` gets, on its kept input entries `s` (all `kh * kw` entries of
    the kept channels), the kernel and bias that best reproduce its original
    output in the least-squares sense over the statistics' data:

    ```
    W_new = W Sigma[:, s] (Sigma[s, s] + ridge * mean(diag Sigma) I)^-1
    b_new = b + W mu - W_new mu[s]
    ```

    (Cholesky solve; the tiny relative ridge keeps dead, constant channels
    solvable and changes nothing measurable otherwise.) A consumer without a
    bias gets the bias change folded into the moving mean of a
    BatchNormalization that alone follows it, or a new bias. Then
    `kc.slim` builds the narrower model (layer names are kept).

    Clusters with several members are treated as plain pruning: the first
    member is kept and the others removed (their contribution is absorbed by
    the least-squares fit rather than summed as C-SGD does). Each consumer
    is refitted to its own original output given the statistics' inputs;
    when several successive groups are pruned at once, the inputs of later
    consumers also change (`structural_search` re-collects statistics group
    by group for that reason). Consumers without statistics (other layer
    types, layers of nested models) drop their removed inputs without
    compensation, with a warning.

    Args:
        model: the trained functional or Sequential `keras.Model`.
        plan: a `PruningPlan` for `model` (bound or not).
        stats: `{layer_name: Stats}` of the consumers, from
            `collect_statistics(model, ...)`.
        ridge: ridge relative to the mean input variance. Defaults to
            `1e-8`.

    Returns:
        The compensated slim `keras.Model` (`model` is left unchanged).

    Raises:
        ValueError: the plan does not fit the model, or statistics do not
            fit their layer.

    Example:

    ```python
    stats = compensation.collect_statistics(model, x_calib)
    plan = kc.make_plan(model, keep=0.5)
    small = compensation.compensate(model, plan, stats)
    ```

    References:
        Xie et al., arXiv 2108.13728, section 3 (compensation).
    """
    if not isinstance(plan, PruningPlan):
        raise TypeError(
            f"`plan` must be a kc.PruningPlan. Received: plan={plan!r}"
        )
    analysis = graph.analyze(model)
    kept_plan = PruningPlan(
        {name: [[c[0]] for c in cl] for name, cl in plan.clusters.items()},
        groups=analysis.groups,
    )
    removed = _removed_inputs(analysis, kept_plan)
    missing = sorted(n for n in removed if n not in stats)
    if missing:
        warnings.warn(
            f"No statistics for consumers {missing}: their removed inputs "
            "are dropped without compensation.",
            stacklevel=2,
        )
    updates = {}
    for name, mask in removed.items():
        if name not in stats:
            continue
        layer = model.get_layer(name)
        kernel = layer.kernel.numpy().astype(np.float64)
        k2d = kernel.reshape(-1, kernel.shape[-1])
        st = stats[name]
        if len(st.mean) != k2d.shape[0]:
            raise ValueError(
                f"`stats[{name!r}]` has {len(st.mean)} entries but the "
                f"layer's kernel reads {k2d.shape[0]}. Were the statistics "
                "collected on another model?"
            )
        kept = np.flatnonzero(~_per_entry(kernel.shape, mask))
        k_new, delta = _least_squares(st, k2d, kept, ridge)
        full = np.zeros_like(k2d)
        full[kept] = k_new
        updates[name] = (full.reshape(kernel.shape), delta)
    return slim(_with_updates(model, updates), kept_plan)


def _with_updates(model, updates):
    """A copy of `model` with compensated kernels and bias changes.

    `updates` is `{layer_name: (kernel, bias change)}`. A layer without a
    bias gets its change folded into the moving mean of a
    BatchNormalization that alone follows it, else a new bias.
    """
    values, new_bias = {}, set()
    for name, (kernel, delta) in updates.items():
        layer = model.get_layer(name)
        values[name] = {"kernel": kernel.astype(layer.kernel.dtype)}
        if layer.use_bias:
            bias = layer.bias.numpy() + delta
            values[name]["bias"] = bias.astype(layer.bias.dtype)
            continue
        bn = graph.following_batchnorm(layer)
        if bn is None:
            new_bias.add(name)
            values[name]["bias"] = delta.astype(layer.kernel.dtype)
        else:
            mean = bn.moving_mean.numpy() - delta
            values.setdefault(bn.name, {})["moving_mean"] = mean.astype(
                bn.moving_mean.dtype
            )

    def configure(name, layer, config):
        if name in new_bias:
            config["use_bias"] = True
        return config

    return rebuild(model, configure=configure, values=values)


# ------------------------------------------------------------------ search
def _searchable(model, analysis) -> list:
    """Prunable groups whose consumers all have collectable statistics."""
    out = []
    for g in analysis.groups:
        names = {lname for lname, _, _ in g.consumers}
        if not g.prunable or not names or any("/" in n for n in names):
            continue
        if all(_supported(model.get_layer(n)) for n in names):
            out.append(g)
    return out


def _group_ranking(model, analysis, group, stats) -> np.ndarray:
    """`cap_rank` of a group over all its consumers (other groups fixed)."""
    root = analysis.gid_of[group.name]
    names, kernels, channels = [], [], []
    for e, gids, chans in analysis.consumer_maps():
        if e.lname not in stats or not (gids == root).any():
            continue
        names.append(e.lname)
        kernels.append(model.get_layer(e.lname).kernel.numpy())
        channels.append(np.where(gids == root, chans, -1))
    return cap_rank([stats[n] for n in names], kernels, channels)


def structural_search(
    model,
    data,
    evaluate,
    acc_start,
    acc_end,
    *,
    steps=6,
    min_keep=0.1,
    verbose=1,
    seed=0,
    max_batches=None,
    batch_size=64,
):
    """Binary structural search of per-group sparsities under compensation.

    The prunable channel groups whose consumers are all top-level
    Conv1D/Conv2D/Dense layers are visited in topological order. For group
    `i` of `n` the accuracy floor is
    `acc_start + (acc_end - acc_start) * (i + 1) / n` (falling linearly to
    `acc_end` at the last group). For each group: collect the statistics of
    its consumers on the current model (which already carries the earlier
    groups' pruning and compensation), rank its channels with `cap_rank`,
    and binary-search over `steps` iterations the largest sparsity in
    `[0, 1 - min_keep]` (removed channels `floor(sparsity * size)`, at least
    one channel kept) whose compensated model scores `evaluate(model) >=
    floor`; the best candidate becomes the current model.

    Args:
        model: the trained functional or Sequential `keras.Model`.
        data: statistics data, in any form `keras_csgd.batches` reads (a
            NumPy array of inputs, a `tf.data.Dataset` of `x` or
            `(x, y, ...)` batches, ...).
        evaluate: callable `evaluate(model) -> float`, the score the floor
            applies to (e.g. validation accuracy); larger is better.
        acc_start: floor after the first group.
        acc_end: floor after the last group.
        steps: binary-search iterations per group. Defaults to `6`.
        min_keep: smallest kept fraction of a group, in (0, 1] (the
            largest sparsity searched is `1 - min_keep`; called
            `max_sparsity=0.9` before). Defaults to `0.1`.
        verbose: `0` silent, `1` progress bar over groups. Defaults to `1`.
        seed: seeds Python, NumPy and the backend
            (`keras.utils.set_random_seed`) before the search, so that a
            stochastic `evaluate` or data pipeline repeats. The search
            itself is deterministic. Defaults to `0`.
        max_batches: batches of `data` per statistics pass. Defaults to
            `None` (all).
        batch_size: batch size for a NumPy `data`. Defaults to `64`.

    Returns:
        `(plan, slim_model)`: a `PruningPlan` bound to `model`'s groups
        (singleton clusters, kept channels in increasing order) and the
        compensated slim model.

    Raises:
        ValueError: for `steps < 1` or `min_keep` outside `(0, 1]`.

    Example:

    ```python
    def evaluate(m):
        m.compile(metrics=["accuracy"], loss="sparse_categorical_crossentropy")
        return m.evaluate(x_val, y_val, verbose=0)[1]

    plan, small = compensation.structural_search(
        model, x_calib, evaluate, acc_start=0.92, acc_end=0.90
    )
    ```

    References:
        Xie et al., arXiv 2108.13728, section 3.3 (binary structural search
        with a step constraint).
    """
    checks.positive_int("steps", steps)
    checks.fraction("min_keep", min_keep)
    keras.utils.set_random_seed(seed)
    groups = _searchable(model, graph.analyze(model))
    bar = keras.utils.Progbar(
        len(groups),
        verbose=verbose,
        stateful_metrics=["floor", "sparsity"],
        unit_name="group",
    )
    current, kept = model, {}
    for i, group in enumerate(groups):
        floor = acc_start + (acc_end - acc_start) * (i + 1) / len(groups)
        analysis = graph.analyze(current)
        names = sorted({lname for lname, _, _ in group.consumers})
        stats = collect_statistics(
            current, data, names, max_batches, verbose=0,
            batch_size=batch_size,
        )
        order = _group_ranking(current, analysis, group, stats)
        size = group.size
        lo, hi, best, tried = 0.0, 1 - min_keep, 0, {}
        for _ in range(steps):
            mid = (lo + hi) / 2
            n_remove = min(size - 1, math.floor(mid * size))
            if n_remove and n_remove not in tried:
                keep = sorted(order[: size - n_remove].tolist())
                plan = PruningPlan({group.name: [[c] for c in keep]})
                candidate = compensate(current, plan, stats)
                tried[n_remove] = (float(evaluate(candidate)), candidate)
            if n_remove == 0 or tried[n_remove][0] >= floor:
                lo, best = mid, max(best, n_remove)
            else:
                hi = mid
        if best:
            current = tried[best][1]
            kept[group.name] = sorted(order[: size - best].tolist())
        bar.update(
            i + 1,
            values=[("floor", floor), ("sparsity", best / size)],
        )
    plan = PruningPlan(
        {name: [[c] for c in keep] for name, keep in kept.items()},
        groups=graph.channel_groups(model),
    )
    return plan, current
