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


def group_rows(values: np.ndarray, group: ChannelGroup, path: str,
               axis: int) -> np.ndarray:
    """A member's values, one row per channel of `group`, in its order.

    Entries of other groups (behind a Concatenate or a split) are left out;
    the copies of a channel behind a depth multiplier share its row.
    """
    w = np.moveaxis(values, axis, 0)
    cmap = group.channel_map(path)
    mine = np.flatnonzero(cmap >= 0)
    order = mine[np.argsort(cmap[mine], kind="stable")]
    return w[order].reshape(group.size, -1)


def producer_filters(model, group: ChannelGroup) -> np.ndarray:
    """The group's producer filters, one row per channel.

    Each producer kernel gives its rows of the group's channels
    (`group_rows`); the producers are concatenated along the features.
    """
    rows = [group_rows(get_variable(model, path).numpy(), group, path, axis)
            for _, path, axis in group.producers]
    return np.concatenate(rows, axis=1)
