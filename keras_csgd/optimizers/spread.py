"""`cluster_spread`: how far the clusters of a plan are from collapsed."""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import pdist

from keras_csgd.graph import producer_filters
from keras_csgd.plan import PruningPlan


def cluster_spread(model, plan: PruningPlan) -> dict:
    """Largest intra-cluster filter distance, relative to the filters' norm.

    For every planned group, the producer filters (one row per channel, all
    producer kernels of the group side by side) are compared within each
    cluster: the group's spread is the largest Euclidean distance between
    two filters of one cluster, divided by the mean filter norm of the
    group. It is 0 once C-SGD has collapsed every cluster (then
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
    for name, clusters in plan.clusters.items():
        filters = producer_filters(model, groups[name]).astype(np.float64)
        scale = np.linalg.norm(filters, axis=1).mean()
        widest = max(
            (pdist(filters[c]).max() for c in clusters if len(c) > 1),
            default=0.0,
        )
        spreads[name] = float(widest / scale) if scale > 0 else 0.0
    return {"overall": max(spreads.values(), default=0.0), "groups": spreads}
