"""Variables of a model by path, and a group's producer filters."""

from __future__ import annotations

import numpy as np

from keras_csgd.groups import ChannelGroup


def short_name(variable) -> str:
    """A variable's name within its layer (`kernel`, `gamma`, ...)."""
    return variable.path.rsplit("/", 1)[-1]


def get_variable(model, path: str):
    """The variable of `model` whose `.path` is `path`.

    Raises:
        ValueError: no such variable.
    """
    for v in model.weights:
        if v.path == path:
            return v
    raise ValueError(
        f"`model` has no variable with path {path!r}. Was the plan made for "
        "another model?"
    )


def producer_filters(model, group: ChannelGroup) -> np.ndarray:
    """The group's producer filters, one row per channel.

    Each producer kernel is moved to `(channels, -1)`, its rows taken in
    the order of the group's channels (a producer split into groups holds
    other groups' rows too), and the producers are concatenated along the
    features.
    """
    rows = []
    for _, path, axis in group.producers:
        w = np.moveaxis(get_variable(model, path).numpy(), axis, 0)
        first = {}
        for i, c in enumerate(group.channel_map(path)):
            first.setdefault(int(c), i)
        order = [first[c] for c in range(group.size)]
        rows.append(w[order].reshape(group.size, -1))
    return np.concatenate(rows, axis=1)
