"""`ChannelGroup`: a set of per-channel variables that are pruned together.

A channel group is one channel space of a model: the output channels of one or
more producers (convolutions, dense layers) whose outputs are coupled (added,
multiplied, averaged), plus every per-channel variable that follows them
(batch normalization, depthwise kernels, PReLU slopes). Its consumers are the
input-side slices of the layers that read it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Slice = tuple[str, str, int]
"""`(layer_name, variable_path, axis)`: one axis of one variable."""


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroup:
    """One prunable (or frozen) channel space of a model.

    Attributes:
        name: stable name, the name of the group's first producer layer.
        size: number of channels.
        members: `(layer_name, variable_path, axis)` of every per-channel
            variable of the group's channel space (producer kernels and
            biases, BN gamma/beta/moving statistics, depthwise kernels, PReLU
            alpha); `axis` is the channel axis in that variable.
        consumers: `(layer_name, variable_path, axis)` input-side slices that
            read the group (consumer kernels, through Flatten and
            Concatenate included).
        producers: the members that are producer kernels (the filters the
            group's channels come from).
        prunable: whether the group may be pruned.
        reason: why the group is frozen, or `None`.
        prune_only: why merging the group's channels is not exact, or
            `None` (a group whose identical channels merge exactly). A
            prune-only group passes a normalization over its channels
            (`LayerNormalization`, RMS norms) whose statistics change when
            channels go: methods that recover by training (magnitude,
            scores, fine-tuning, distillation) may remove its channels;
            C-SGD, whose slim model must equal the trained one, may not
            plan it, and no plan may merge its channels. See `exact`.
        maps: for members whose channel axis is not simply `0..size-1` (after
            a Concatenate, or a depthwise multiplier), the group channel of
            every entry along that axis (`-1`: entry of another group). Use
            `channel_map(path)`.
    """

    name: str
    size: int
    members: tuple[Slice, ...] = ()
    consumers: tuple[Slice, ...] = ()
    producers: tuple[Slice, ...] = ()
    prunable: bool = True
    reason: str | None = None
    prune_only: str | None = None
    maps: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """Whether identical channels of the group merge exactly (C-SGD
        may plan it); `False` for a prune-only group."""
        return self.prune_only is None

    def channel_map(self, path: str) -> np.ndarray:
        """Group channel of every entry along a member's channel axis.

        Args:
            path: the member's variable path.

        Returns:
            An int array as long as the variable's channel axis: the group
            channel each entry belongs to, `-1` for entries of other groups.
            A channel appears more than once behind a depthwise multiplier.
        """
        if path in self.maps:
            return self.maps[path]
        if not any(m[1] == path for m in self.members):
            raise ValueError(
                f"`path` is not a member of group {self.name!r}. "
                f"Received: path={path!r}"
            )
        return np.arange(self.size)

    def to_dict(self) -> dict:
        """JSON-ready description (members, axes, sizes, maps)."""
        return {
            "name": self.name,
            "size": self.size,
            "members": [list(m) for m in self.members],
            "consumers": [list(c) for c in self.consumers],
            "producers": [list(p) for p in self.producers],
            "prunable": self.prunable,
            "reason": self.reason,
            "prune_only": self.prune_only,
            "maps": {k: v.tolist() for k, v in self.maps.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ChannelGroup:
        """Inverse of `to_dict`."""
        return cls(
            name=d["name"],
            size=int(d["size"]),
            members=tuple(tuple(m) for m in d.get("members", ())),
            consumers=tuple(tuple(c) for c in d.get("consumers", ())),
            producers=tuple(tuple(p) for p in d.get("producers", ())),
            prunable=bool(d.get("prunable", True)),
            reason=d.get("reason"),
            prune_only=d.get("prune_only"),
            maps={
                k: np.asarray(v, dtype=np.int64)
                for k, v in d.get("maps", {}).items()
            },
        )

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"frozen: {self.reason}"
        if self.prunable and not self.exact:
            state = f"prune-only: {self.prune_only}"
        return (
            f"ChannelGroup({self.name!r}, size={self.size}, "
            f"members={len(self.members)}, consumers={len(self.consumers)}, "
            f"{state})"
        )
