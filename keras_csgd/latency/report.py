"""`LatencyReport` (what `plan_for_latency` chose and measured) and the
importance a plan keeps."""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_csgd import graph
from keras_csgd.latency import planner
from keras_csgd.latency.design import removable_blocks
from keras_csgd.methods.magnitude import filter_norms
from keras_csgd.plan import PruningPlan


@dataclasses.dataclass
class LatencyReport:
    """What `plan_for_latency` chose and measured.

    Attributes:
        target: the target, a fraction of the full model's latency.
        runtime: the runtime (one of `kc.latency.RUNTIMES`).
        batch_size: the batch size timed.
        full_ms: the full model's measured latency, its fastest block
            median interleaved with the slim one (the table's when not
            verified).
        slim_ms: the slim model's measured latency, likewise, or `None`.
        measured_ratio: `slim_ms / full_ms`, or `None`.
        predicted_ms: the table's prediction for the plan (never
            negative, see `LatencyTable.floored`).
        predicted_ratio: `predicted_ms / table.full`.
        met: whether `measured_ratio <= target * (1 + tolerance)` (`None`
            when not verified).
        macs: `(full, slim)` multiply-accumulates, or `None` for a model
            with a dynamic dimension (a sequence length: count them at one
            with `kc.count_macs(..., input_shape=)`).
        params: `(full, slim)` parameter counts.
        widths: `{group: (width, size)}` of every planned group.
        remove_blocks: the removed blocks' Add layer names.
        kept_importance: kept share of the total importance (see
            `kept_importance`).
        iterations: one dict per verified plan: budget, predicted and
            measured ratios.
        reason: why the target was not met, or `None`.
    """

    target: float
    runtime: str
    batch_size: int
    full_ms: float
    slim_ms: float | None
    measured_ratio: float | None
    predicted_ms: float
    predicted_ratio: float
    met: bool | None
    macs: tuple[int, int] | None
    params: tuple[int, int]
    widths: dict
    remove_blocks: list
    kept_importance: float
    iterations: list
    reason: str | None = None

    def to_dict(self) -> dict:
        """The report as JSON-ready builtins."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        measured = (
            f"measured {self.slim_ms:.3f} ms of {self.full_ms:.3f} ms "
            f"({self.measured_ratio:.3f})"
            if self.measured_ratio is not None else "not measured"
        )
        macs = ("" if self.macs is None
                else f"MACs {self.macs[1] / self.macs[0]:.3f}, ")
        return (
            f"{self.runtime} batch {self.batch_size}, target "
            f"{self.target:g}: predicted {self.predicted_ratio:.3f}, "
            f"{measured}; {macs}params "
            f"{self.params[1] / self.params[0]:.3f} of the full model; "
            f"{len(self.remove_blocks)} blocks removed"
        )


def default_scores(model, an: graph.Analysis) -> dict[str, np.ndarray]:
    """L1 filter norms of every prunable group (`filter_norms`)."""
    return {g.name: filter_norms(model, g, "l1")
            for g in an.groups if g.prunable}


def kept_importance(model, plan: PruningPlan, scores=None) -> float:
    """Share of the total importance a plan keeps.

    Each group's scores are divided by their largest; a group keeps the sum
    of its `width` best scores (all of them when unplanned, none when it
    lies inside a removed block); the result is the kept sum over the sum of
    all scores.

    Args:
        model: the model the plan is for.
        plan: a `PruningPlan` (its removed blocks count).
        scores: `{group: per-channel scores}`. Defaults to `None` (L1
            filter norms of every prunable group).

    Returns:
        A fraction in [0, 1].
    """
    an = graph.analyze(model)
    scores = default_scores(model, an) if scores is None else scores
    values = planner.kept_values(scores)
    inner = removable_blocks(model, an)
    gone = {g for b in plan.remove_blocks for g in inner.get(b, ())}
    kept = planner.value_of(values, plan.widths(), gone)
    return kept / planner.value_of(values, {})
