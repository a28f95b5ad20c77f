"""`compensate`: slim a model by a plan and refit its consumers."""

from __future__ import annotations

import warnings

import numpy as np

from keras_csgd import graph
from keras_csgd.methods.compensation.blocks import refit_block_readers
from keras_csgd.methods.compensation.solve import least_squares, per_entry
from keras_csgd.plan import PruningPlan
from keras_csgd.rebuild import rebuild, with_bias
from keras_csgd.surgery import slim


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


def compensate(model, plan, stats, ridge=1e-8, data=None):
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

    Residual blocks the plan removes (`plan.remove_blocks`) are compensated
    when `data` is given: the first Conv/Dense layers that read a removed
    block are refitted to their unpruned output from the slim model's
    inputs (`blocks.refit_block_readers`); an identity shortcut into a kept
    block has nothing to refit, and what passes there is lost until
    fine-tuning.

    Args:
        model: the trained functional or Sequential `keras.Model`.
        plan: a `PruningPlan` for `model` (bound or not).
        stats: `{layer_name: Stats}` of the consumers, from
            `collect_statistics(model, ...)`.
        ridge: ridge relative to the mean input variance. Defaults to
            `1e-8`.
        data: inputs (any form `keras_csgd.batches` reads) on which the
            readers of removed blocks are refitted. Defaults to `None`
            (removed blocks are not compensated; a warning says so).

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
        groups=analysis.groups, remove_blocks=plan.remove_blocks,
        gates=plan.gates,
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
        kept = np.flatnonzero(~per_entry(kernel.shape, mask))
        k_new, delta = least_squares(st, k2d, kept, ridge)
        full = np.zeros_like(k2d)
        full[kept] = k_new
        updates[name] = (full.reshape(kernel.shape), delta)
    with warnings.catch_warnings():  # removed blocks are compensated next
        warnings.filterwarnings("ignore", "`slim` removes residual blocks")
        small = slim(_with_updates(model, updates), kept_plan)
    if not kept_plan.remove_blocks:
        return small
    if data is None:
        warnings.warn(
            f"The plan removes blocks {list(kept_plan.remove_blocks)}; "
            "without `data`, the layers that read them are not refitted.",
            stacklevel=2,
        )
        return small
    return _with_updates(
        small, refit_block_readers(model, small, kept_plan, data, ridge)
    )


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

    return rebuild(model, configure=dict.fromkeys(new_bias, with_bias),
                   values=values)

