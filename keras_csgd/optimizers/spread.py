"""`cluster_spread`: how far the clusters of a plan are from collapsed."""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import pdist

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
