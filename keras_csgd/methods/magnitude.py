"""Filter-norm pruning (Li et al. 2017): the classic magnitude baseline."""

from __future__ import annotations

import numpy as np

from keras_csgd import checks, graph
from keras_csgd.groups import ChannelGroup
from keras_csgd.plan import PruningPlan
from keras_csgd.scoring import plan_from_scores

NORMS = ("l1", "l2")


def filter_norms(
    model, group: ChannelGroup, norm: str = "l2"
) -> np.ndarray:
    """One norm per channel over ALL producer filters of a group.

    For coupled groups (residual adds), the channel's filters in every
    producer are taken together: `l2` is the square root of the sum of
    squares over all of them, `l1` the sum of absolute values.

    Args:
        model: the model that holds the group's variables.
        group: a `ChannelGroup` of `model`.
        norm: `"l1"` or `"l2"`. Defaults to `"l2"`.

    Returns:
        A float64 array of `group.size` norms.

    Raises:
        ValueError: unknown `norm`.
    """
    checks.choice("norm", norm, NORMS)
    return row_norms(graph.producer_filters(model, group), norm)


def row_norms(rows: np.ndarray, norm: str) -> np.ndarray:
    """The `"l1"` or `"l2"` norm of every row, in float64."""
    rows = rows.astype(np.float64)
    if norm == "l1":
        return np.abs(rows).sum(axis=1)
    return np.sqrt(np.square(rows).sum(axis=1))


def magnitude_plan(
    model,
    *,
    keep: float = 0.5,
    norm: str = "l1",
    round_to: int | None = None,
) -> PruningPlan:
    """Keeps the channels whose producer filters have the largest norms.

    The filter-norm criterion of Li et al.: in every prunable group, rank
    channels by the norm of their filters (one norm per channel over all
    producers of the group, so coupled residual layers are pruned
    consistently, see `filter_norms`) and keep the
    `target_width(size, keep, round_to)` largest. Fine-tune the slim model
    afterwards, as in the paper. It reads no data, so it has no `data`
    argument; `keep` and the rest are keyword-only, as in every method.

    Args:
        model: a functional or Sequential `keras.Model`.
        keep: kept fraction of every prunable group, in (0, 1]. Defaults to
            `0.5`.
        norm: `"l1"` (the paper's) or `"l2"`. Defaults to `"l1"`.
        round_to: round widths to a multiple of `round_to`. Defaults to
            `None`.

    Returns:
        A bound `PruningPlan` of singleton clusters.

    Raises:
        ValueError: bad `keep`, `norm` or `round_to`.

    Example:

    ```python
    plan = kc.methods.magnitude_plan(model, keep=0.5, norm="l1")
    slim = kc.slim(model, plan)  # then fine-tune
    ```

    References:
        Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient
        ConvNets. ICLR 2017, arXiv 1608.08710.
    """
    scores = {
        g.name: filter_norms(model, g, norm)
        for g in graph.channel_groups(model)
        if g.prunable
    }
    return plan_from_scores(model, scores, keep, round_to=round_to)
