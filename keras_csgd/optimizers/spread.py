"""`cluster_spread`: how far the clusters of a plan are from collapsed;
`collapse_strength`: the centripetal pull that collapses them over a
schedule."""

from __future__ import annotations

import keras
import numpy as np
from scipy.spatial.distance import pdist

from keras_csgd import checks
from keras_csgd.graph import get_variable, group_rows
from keras_csgd.plan import PruningPlan

_STATISTICS = ("moving_mean", "moving_variance")


def _channel_rows(model, variables: dict, group) -> np.ndarray:
    """Every trained per-channel value of the group, one row per channel.

    Producer kernels and biases, BN gamma/beta, depthwise kernels, PReLU
    alpha, their entries of the group's channels (`graph.group_rows`),
    except BN moving statistics, which follow the others.
    """
    rows = []
    for _, path, axis in group.members:
        if path.rsplit("/", 1)[-1] in _STATISTICS:
            continue
        variable = (variables[path] if path in variables
                    else get_variable(model, path))  # raises
        rows.append(group_rows(variable.numpy(), group, path, axis))
    return np.concatenate(rows, axis=1).astype(np.float64)


def _widest(filters: np.ndarray, clusters) -> float:
    """The largest distance between two rows of one cluster.

    Pairs (most clusters of an even plan) are measured at once; larger
    clusters one by one.
    """
    pairs = np.array([c for c in clusters if len(c) == 2], int).reshape(-1, 2)
    widest = np.linalg.norm(filters[pairs[:, 0]] - filters[pairs[:, 1]],
                            axis=1)
    return max([*widest, *(pdist(filters[c]).max()
                           for c in clusters if len(c) > 2)], default=0.0)


def cluster_spread(model, plan: PruningPlan) -> dict:
    """Largest intra-cluster filter distance, relative to the filters' norm.

    For every planned group, the channels' trained values (one row per
    channel: producer kernels and biases, BN gamma and beta, depthwise
    kernels, side by side) are compared within each cluster: the group's
    spread is the largest Euclidean distance between two rows of one
    cluster, divided by the mean row norm of the group. BN gamma/beta are
    included because C-SGD pulls them `vector_strength_scale` times more
    weakly than the kernels: slimming is exact only once they agree too.
    It is 0 once C-SGD has collapsed every cluster (then
    `kc.slim(model, plan)` is exact) and for groups of singleton clusters.

    Args:
        model: the model the plan was made for.
        plan: a bound `kc.PruningPlan`.

    Returns:
        `{"overall": float, "groups": {group_name: float}}`; `"overall"` is
        the largest group spread (0.0 for an empty plan).

    Raises:
        ValueError: if the plan is not bound or names variables `model`
            lacks.

    Example:

    ```python
    kc.cluster_spread(model, plan)["overall"]  # 0.0 when collapsed
    ```
    """
    groups = plan.require_bound("`cluster_spread`")
    spreads = {}
    variables = {v.path: v for v in model.weights}
    for name, clusters in plan.clusters.items():
        filters = _channel_rows(model, variables, groups[name])
        scale = np.linalg.norm(filters, axis=1).mean()
        widest = _widest(filters, clusters)
        spreads[name] = float(widest / scale) if scale > 0 else 0.0
    return {"overall": max(spreads.values(), default=0.0), "groups": spreads}


def collapse_strength(learning_rate, steps, *, momentum=0.9,
                      collapse=1e-6) -> float:
    """The weakest C-SGD pull that collapses the clusters over a schedule.

    Under `kc.CSGD` the differences within a cluster (and a removed
    block's gate) get no loss gradient and shrink by `1 - lr_t * eps` per
    step, about `exp(-eps * sum_t lr_t / (1 - momentum))` over the whole
    schedule with momentum. This is the `eps` (`centripetal_strength`)
    that makes that factor `collapse`, so that `kc.slim` is exact at the
    end of training (`cluster_spread` measures it) while the pull, which
    costs accuracy, is no stronger than that. On a trained CIFAR
    ResNet-20, 3 epochs on 9k images from lr 0.03 (`keras-csgd prune` in
    `benchmarks/latency_methods.py`, 2 seeds), a fixed strength of 0.3 (a
    collapse of 5e-9) gave 75.5% and 0.2 (about this one's 0.22) 75.9%.

    Args:
        learning_rate: a float, or a
            `keras.optimizers.schedules.LearningRateSchedule`.
        steps: the number of optimizer steps of training, `>= 1`.
        momentum: the optimizer's momentum, in `[0, 1)`. Defaults to
            `0.9`.
        collapse: the factor the differences shrink by, in `(0, 1)`.
            Defaults to `1e-6`.

    Returns:
        The centripetal strength, a positive float.

    Example:

    ```python
    rate = keras.optimizers.schedules.CosineDecay(0.03, epochs * steps)
    eps = kc.optimizers.collapse_strength(rate, epochs * steps)
    model.compile(optimizer=kc.CSGD(plan, learning_rate=rate,
                                    centripetal_strength=eps), ...)
    ```
    """
    steps = checks.positive_int("steps", steps)
    checks.number("momentum", momentum, low=0, high=1, high_open=True)
    checks.fraction("collapse", collapse, high_closed=False)
    if callable(learning_rate):
        rates = keras.ops.convert_to_numpy(
            learning_rate(np.arange(steps, dtype="float32")))
    else:
        rates = np.full(steps, float(learning_rate))
    total = float(np.sum(rates))
    if not total > 0:
        raise ValueError(
            "`learning_rate` must be positive over the schedule. "
            f"Received: learning_rate={learning_rate!r}")
    return float(-np.log(collapse) * (1 - momentum) / total)
