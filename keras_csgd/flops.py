"""MACs of a model, at full width or under a plan: one analytic cost model.

The layer handlers (`keras_csgd.layers`) record, for every layer call, its
multiply-accumulates at full width and the channel layouts they scale with
(`graph.Cost`). A plan's MACs follow without building the slim model: each
call's MACs times the kept share of each of its layouts.

Work nobody can count is never a silent 0: a call no handler counts
(`Analysis.uncounted`: a layer the registry does not know and that does not
trace, an unregistered operation, a handler's refusal) makes `count_macs`
and `macs_under` warn with its name and why, and a dynamic dimension (a
text model's sequence length) makes them raise unless `input_shape` fixes
it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

from keras_csgd import graph


def _checked(costs) -> list:
    unknown = [c.lname for c in costs if c.macs is None]
    if unknown:
        raise ValueError(
            "Counting MACs needs static shapes, and these layers see a "
            f"dynamic dimension: {unknown[:5]}. Pass the shape of one "
            "example, e.g. `count_macs(model, input_shape=(128,))` for a "
            "sequence length of 128. Received: input_shape=None"
        )
    return costs


def _warn_uncounted(an: graph.Analysis) -> None:
    """Warns naming the calls whose MACs are not counted."""
    if an.uncounted:
        names = ", ".join(f"{name} ({why})" for name, why in
                          list(an.uncounted.items())[:8])
        more = len(an.uncounted) - 8
        warnings.warn(
            f"MACs of {len(an.uncounted)} call(s) are not counted: {names}"
            + (f" and {more} more" if more > 0 else "")
            + ". Register a handler (`kc.register_layer`) to count them.",
            stacklevel=3,
        )


def count_macs(model, analysis: graph.Analysis | None = None,
               input_shape=None) -> int:
    """Multiply-accumulates of one forward pass of one example.

    Counts every layer the layer registry knows (convolutions of every kind,
    dense layers, attention, registered custom layers), nested models
    included; element-wise layers (BN, activations, additions) count 0, as
    is usual. A layer the registry does not know is not counted, and never
    in silence: a warning names it.

    Args:
        model: a built functional or Sequential `keras.Model`.
        analysis: `graph.analyze(model)`, when already at hand (not used
            with `input_shape`). Defaults to `None` (analysed here).
        input_shape: the shape of one example (no batch axis) for a model
            with dynamic dimensions: one shape for every input alike
            (`(128,)`: token ids and padding mask of a text model), a list
            in `model.inputs` order, or a dict by input name. Defaults to
            `None` (the model's own input shapes, which must be static).

    Returns:
        The number of multiply-accumulates (int).

    Raises:
        ValueError: for a subclassed model, a dynamic dimension that
            `input_shape` does not fix, or an `input_shape` that does not
            fit the inputs.

    Example:

    ```python
    kc.count_macs(kc.models.resnet_cifar(56))  # about 125.5 million
    kc.count_macs(bert_backbone, input_shape=(128,))
    ```
    """
    an = _analysis(model, analysis, input_shape)
    _warn_uncounted(an)
    return int(sum(c.macs for c in _checked(an.costs)))


def _analysis(model, analysis, input_shape) -> graph.Analysis:
    """The model's analysis, on static input shapes where it needs them.

    A model with static inputs can still have dynamic dimensions inside
    (a nested keras_hub backbone built for any image size): it is analysed
    again on its own static inputs.
    """
    if input_shape is None:
        an = analysis or graph.analyze(model)
        if all(c.macs is not None for c in an.costs):
            return an
    with graph.static_inputs(model, input_shape) as static:
        return graph.analyze(static)


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


def macs_under(model, plan, analysis: graph.Analysis | None = None,
               input_shape=None) -> int:
    """MACs of `kc.slim(model, plan)`, without building it.

    Args:
        model: the model the plan is for.
        plan: a `PruningPlan` (its removed blocks included).
        analysis: `graph.analyze(model)` when at hand (ignored with
            `input_shape`). Defaults to `None`.
        input_shape: the shape of one example for a model with dynamic
            dimensions, as in `count_macs`. Defaults to `None`.

    Returns:
        The slim model's multiply-accumulates (int).
    """
    from keras_csgd import blocks

    an = _analysis(model, analysis, input_shape)
    _warn_uncounted(an)
    widths = {an.gid_of[n]: w for n, w in plan.widths().items()}
    dropped = blocks.dropped_operations(model, plan.remove_blocks)
    return round(macs_at(an, widths, dropped))
