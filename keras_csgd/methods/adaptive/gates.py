"""The gate layers of adaptive pruning: per channel and per residual block."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="keras_csgd")
class ChannelGate(keras.layers.Layer):
    """Learnable non-negative per-channel scale with a sparsity penalty.

    Multiplies its input by `g = gate * mask` (`gate`: one entry per
    channel, initialised to 1, kept `>= 0` by a `NonNeg` constraint so that
    gates can reach exactly 0; `mask`: non-trainable, 1 until `lock` holds a
    gate at 0) and adds the loss `strength * cost * sum(g)**2 / sum(g**2)`,
    where `strength` is a non-trainable weight that
    `kc.callbacks.MacsTargetCallback` adjusts. This Hoyer-square measure
    counts the open gates (it is `k` for `k` equal open gates) and is blind
    to a common scale of all the gates. An L1 penalty is not: it shrinks all
    the gates of a layer together, which costs nothing when a
    BatchNormalization further on renormalises the channels, until their
    signal drowns in that BN's epsilon.

    Args:
        cost: weight of this gate's penalty (the cost of one channel, as a
            fraction of the model's cost, divided by the number of layers
            the gate multiplies). Defaults to `1.0`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`).

    Example:

    ```python
    y = ChannelGate(cost=0.01)(x)  # x: (..., channels)
    ```

    References:
        Liu et al., "Learning Efficient Convolutional Networks through
        Network Slimming", arXiv 1708.06519; Yang et al., "DeepHoyer",
        arXiv 1908.09979.
    """

    def __init__(self, cost=1.0, **kwargs):
        super().__init__(**kwargs)
        self.cost = float(cost)

    def _gate_shape(self, input_shape):
        return (input_shape[-1],)

    def build(self, input_shape):
        self.gate = self.add_weight(
            shape=self._gate_shape(input_shape),
            initializer="ones",
            constraint="non_neg",
            name="gate",
        )
        self.mask = self.add_weight(
            shape=self._gate_shape(input_shape),
            initializer="ones",
            trainable=False,
            name="mask",
        )
        self.strength = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="strength"
        )

    def penalty(self, gate):
        """The sparsity measure of `gate` (before `strength * cost`)."""
        total = ops.sum(gate)
        return total * total / (ops.sum(gate * gate) + 1e-12)

    def call(self, x):
        gate = self.gate * self.mask
        self.add_loss(
            ops.cast(self.strength * self.cost, "float32")
            * ops.cast(self.penalty(gate), "float32")
        )
        return x * ops.cast(gate, x.dtype)

    def value(self) -> np.ndarray:
        """The effective gate, `gate * mask`, as a NumPy array."""
        return self.gate.numpy() * self.mask.numpy()

    def lock(self, keep) -> None:
        """Holds the gates where `keep` is False at exactly 0 from now on."""
        keep = np.asarray(keep, bool).reshape(self.mask.shape)
        self.mask.assign(self.mask.numpy() * keep)
        self.gate.assign(self.gate.numpy() * keep)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "cost": self.cost}


@keras.saving.register_keras_serializable(package="keras_csgd")
class BlockGate(ChannelGate):
    """Learnable non-negative scalar gate of a residual branch.

    Same as `ChannelGate` with one gate for all channels and an L1
    penalty, `strength * cost * gate`: multiplies the branch output before
    the residual `Add` (whose sum with the shortcut does depend on the
    gate's scale); a closed gate (0) makes the block the identity of its
    shortcut.

    Args:
        cost: weight of the penalty (the branch's cost as a fraction of the
            model's cost). Defaults to `1.0`.
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    ```python
    out = keras.layers.Add()([shortcut, BlockGate(cost=0.1)(branch)])
    ```
    """

    def _gate_shape(self, input_shape):
        return (1,)

    def penalty(self, gate):
        return ops.sum(gate)
