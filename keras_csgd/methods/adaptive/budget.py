"""The budget of adaptive pruning: a cost model and a target in its units.

A cost is a callable `cost(widths, removed_blocks) -> float`: the cost of
the slim model whose channel groups have the given widths (`{group name:
width}`, groups not named keep theirs; widths may be fractional) and whose
residual blocks `removed_blocks` (names of their `Add` layers) are removed.
The MACs one (`macs_cost`) is the package's analytic cost model
(`kc.flops.macs_at`); a latency table gives the latency one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from keras_csgd import flops, graph

Cost = Callable[[Mapping[str, float], set], float]


@dataclasses.dataclass
class Budget:
    """A cost model, the cost of the full model and the target cost.

    Attributes:
        cost: the cost callable (see the module docstring).
        full: `cost({}, set())`, the full model's cost.
        target: the budget, in the units of `cost`.
    """

    cost: Cost
    full: float
    target: float


def macs_cost(an: graph.Analysis, block_ops: Mapping[str, set]) -> Cost:
    """The MACs cost of a model's analysis.

    Args:
        an: `graph.analyze(model)`.
        block_ops: `{Add name: names of the top-level operations its
            removal drops}`.

    Returns:
        The cost callable: `kc.flops.macs_at` at the widths, without the
        layer calls of the removed blocks (nested models' calls included).
    """
    def cost(widths, removed) -> float:
        ops = set().union(*(block_ops[n] for n in removed))
        dropped = {c.lname for c in an.costs
                   if c.lname.split("/", 1)[0] in ops}
        return flops.macs_at(
            an, {an.gid_of[n]: w for n, w in widths.items()}, dropped
        )

    return cost


def macs_budget(cost: Cost, base_macs: int, macs_target) -> Budget:
    """The budget of a MACs target.

    Args:
        cost: the MACs cost (`macs_cost`).
        base_macs: the model's MACs.
        macs_target: a fraction of them in (0, 1), or a number of MACs
            (`> 1`, below `base_macs`).

    Raises:
        TypeError: `macs_target` is not a number.
        ValueError: it is out of range.
    """
    if isinstance(macs_target, bool) or not isinstance(
        macs_target, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            "`macs_target` must be a fraction in (0, 1) or a number of MACs."
            f" Received: macs_target={macs_target!r}"
        )
    target = macs_target * base_macs if macs_target < 1 else macs_target
    if not 0 < target < base_macs:
        raise ValueError(
            "`macs_target` must be a fraction in (0, 1) or a number of MACs "
            f"below the model's {base_macs}. "
            f"Received: macs_target={macs_target!r}"
        )
    return Budget(cost, float(base_macs), float(round(target)))


def latency_budget(table, latency_target) -> Budget:
    """The budget of a latency target, from a latency table.

    Args:
        table: an object with `predict(widths, remove_blocks=()) -> ms` and
            `full` (ms of the full model), such as `kc.latency.LatencyTable`.
        latency_target: a fraction of `table.full` in (0, 1).

    Raises:
        TypeError: `table` lacks `predict` or `full`.
        ValueError: `latency_target` is not in (0, 1).
    """
    if not callable(getattr(table, "predict", None)) or not hasattr(
        table, "full"
    ):
        raise TypeError(
            "`latency_table` must have `predict(widths, remove_blocks)` and "
            f"`full` (a LatencyTable). Received: latency_table={table!r}"
        )
    if isinstance(latency_target, bool) or not isinstance(
        latency_target, (int, float, np.integer, np.floating)
    ) or not 0 < latency_target < 1:
        raise ValueError(
            "`latency_target` must be a fraction in (0, 1) of the full "
            f"model's latency. Received: latency_target={latency_target!r}"
        )

    def cost(widths, removed) -> float:
        return float(
            table.predict(dict(widths), remove_blocks=sorted(removed))
        )

    full = float(table.full)
    return Budget(cost, full, latency_target * full)
