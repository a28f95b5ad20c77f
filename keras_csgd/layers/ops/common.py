"""Helpers the `keras.ops` channel rules share."""

from __future__ import annotations


def _rank(t) -> int:
    return len(t.shape)


def _axes(axis, rank: int) -> set[int]:
    """The axes an `axis` argument names (every axis for `None`)."""
    if axis is None:
        return set(range(rank))
    axes = axis if isinstance(axis, (list, tuple)) else (axis,)
    return {a % rank for a in axes}


def _freeze(ctx, lays, reason: str) -> None:
    for lay in lays:
        if lay is not None:
            ctx.freeze(lay, reason)
