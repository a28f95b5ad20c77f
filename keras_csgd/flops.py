"""MACs of a model, at full width or under a plan: one analytic cost model.

The layer handlers (`keras_csgd.layers`) record, for every layer call, its
multiply-accumulates at full width and the channel layouts they scale with
(`graph.Cost`). A plan's MACs follow without building the slim model: each
call's MACs times the kept share of each of its layouts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from keras_csgd import graph


def _checked(costs) -> list:
    unknown = [c.lname for c in costs if c.macs is None]
    if unknown:
        raise ValueError(
            "`count_macs` needs static spatial shapes; build the model on a "
            "`keras.Input` with a full shape. Layers with an unknown spatial "
            f"size: {unknown[:5]}"
        )
    return costs


def count_macs(model, analysis: graph.Analysis | None = None) -> int:
    """Multiply-accumulates of one forward pass of one example.

    Counts every layer the layer registry knows (convolutions of every kind,
    dense layers, attention, registered custom layers), nested models
    included; element-wise layers (BN, activations, additions) count 0, as
    is usual.

    Args:
        model: a built functional or Sequential `keras.Model` with static
            spatial input shapes.
        analysis: `graph.analyze(model)`, when already at hand. Defaults to
            `None` (analysed here).

    Returns:
        The number of multiply-accumulates (int).

    Raises:
        ValueError: for a subclassed model or dynamic spatial shapes.

    Example:

    ```python
    kc.count_macs(kc.models.resnet_cifar(56))  # about 125.5 million
    ```
    """
    an = analysis or graph.analyze(model)
    return int(sum(c.macs for c in _checked(an.costs)))


def kept_share(an: graph.Analysis, layout, widths: Mapping[int, int]) -> float:
    """Kept fraction of a layout's entries at new widths `{root gid: w}`."""
    lay = an.root(layout)
    new = {**an.sizes, **widths}
    return graph.layout_size(lay, new) / graph.layout_size(lay, an.sizes)


def macs_at(an: graph.Analysis, widths: Mapping[int, int],
            dropped: frozenset | set = frozenset()) -> float:
    """MACs at new group widths `{root gid: width}`.

    Args:
        an: the model's analysis.
        widths: new width per root gid (groups not named keep theirs).
        dropped: names of layer calls removed altogether (a removed
            residual branch).
    """
    return sum(
        c.macs * math.prod(kept_share(an, lay, widths) for lay in c.layouts)
        for c in _checked(an.costs) if c.lname not in dropped
    )


def macs_under(model, plan, analysis: graph.Analysis | None = None) -> int:
    """MACs of `kc.slim(model, plan)`, without building it.

    Args:
        model: the model the plan is for.
        plan: a `PruningPlan` (its removed blocks included).
        analysis: `graph.analyze(model)` when at hand. Defaults to `None`.

    Returns:
        The slim model's multiply-accumulates (int).
    """
    from keras_csgd import blocks

    an = analysis or graph.analyze(model)
    widths = {an.gid_of[n]: w for n, w in plan.widths().items()}
    dropped = blocks.dropped_operations(model, plan.remove_blocks)
    return round(macs_at(an, widths, dropped))
