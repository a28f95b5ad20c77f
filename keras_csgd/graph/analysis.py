"""Channel-group analysis of a functional Keras model.

The model's own node structure is read, and that of the composite layers it
calls (`trace`: their `call` run on Keras tensors): every tensor gets a
*layout*, the structure of its last (channel) axis in terms of channel groups:

- `("leaf", gid)`: the channels of group `gid`, in order;
- `("cat", (layout, ...))`: a channel-axis concatenation;
- `("tile", layout, t)`: `t` copies (Flatten: positions outer, channels inner);
- `("rep", layout, m)`: every channel repeated `m` times (depth multiplier);
- `("grid", outer, inner)`: every pair of channels, outer-major (grouped
  query heads; an axis a reshape made of several, `grid(heads,
  head_size)`).

A tensor's other axes hold no channels (batch, positions), except where a
reshape or transpose moved channels there (an attention's heads): the
analysis keeps an `Axes` per tensor, one layout (or `None`) per axis.
Handlers that declare `axes` read and return them (`Call.axes`); for the
others, channels on any axis but the last freeze.

Producers (Conv*, Dense, SeparableConv pointwise, Conv*Transpose) start a new
group; per-channel layers (BatchNormalization, DepthwiseConv, PReLU) add their
variables to it; merges (Add, Multiply, ...) unify groups, splits cut them
into parts (`spaces`); consumers record the layout of their input axis. A
group that reaches a model output, an untraceable layer, an unknown
operation or an unmappable reshape is frozen with a reason.

The walk and the declarations handlers make are `context.Context`'s; what
they record (`Entry`, `Cost`, `Call`) and return (`Analysis`) is in
`records`.
"""

from __future__ import annotations

from keras_csgd.graph.context import Context
from keras_csgd.graph.layout import Axes
from keras_csgd.graph.nodes import channels, check_functional, producer_name
from keras_csgd.graph.records import Analysis
from keras_csgd.groups import ChannelGroup


def analyze(model) -> Analysis:
    """Channel analysis of `model` (groups, entries, layouts)."""
    check_functional(model)
    an = Context()
    an.batch = model.inputs[0].shape[0] if model.inputs[0].shape else None
    in_axes = []
    for t in model.inputs:
        lay = an.new_group(channels(t), f"input:{producer_name(t)}",
                           "model input")
        in_axes.append(Axes((*(None,) * (len(t.shape) - 1), lay)))
    an.model_outputs = an.run_model(model, in_axes, "")
    return an.finish(model)


def channel_groups(model) -> list[ChannelGroup]:
    """Finds the channel groups of a functional or Sequential Keras model.

    A group is a set of per-channel variables that must be pruned together:
    the output channels of its producers (coupled through Add, Multiply,
    ... into one group), every per-channel variable that follows, and the
    input slices of its consumers.

    Args:
        model: a built functional or Sequential `keras.Model`.

    Returns:
        A list of `ChannelGroup`, in topological order of their first
        producer. Frozen groups (`prunable=False`) say why in `reason`.

    Raises:
        ValueError: for a subclassed model.

    Example:

    ```python
    for g in kc.channel_groups(model):
        print(g.name, g.size, g.prunable, g.reason)
    ```
    """
    return analyze(model).groups
