"""The producers of a channel group that soft pruning zeroes: a kernel,
with the BatchNormalization that follows it (`batchnorm="scale"`)."""

from __future__ import annotations

import numpy as np


class Producer:
    """One producer kernel of a group, with the BN that follows it."""

    def __init__(self, kernel, axis, bn, bias):
        self.kernel = kernel
        self.axis = axis
        self.bn = bn
        self.bias = bias

    def _per_channel(self, values):
        shape = [1] * len(self.kernel.shape)
        shape[self.axis] = -1
        return np.reshape(values, shape)

    def filters(self, scaled):
        """The filters, `(channels, -1)`; BN-folded when `scaled`."""
        w = self.kernel.numpy().astype(np.float64)
        if scaled and self.bn is not None:
            bn = self.bn
            scale = np.abs(bn.gamma.numpy()) / np.sqrt(
                bn.moving_variance.numpy().astype(np.float64) + bn.epsilon
            )
            w = w * self._per_channel(scale)
        return np.moveaxis(w, self.axis, 0).reshape(w.shape[self.axis], -1)

    def zero(self, channels, scaled):
        """Zeroes `channels`: BN `gamma` and `beta` when `scaled`, else the
        kernel."""
        if scaled and self.bn is not None:
            _assign_at(self.bn.gamma, channels, 0.0)
            if self.bn.center:
                _assign_at(self.bn.beta, channels, 0.0)
            return
        mask = np.ones(self.kernel.shape[self.axis], self.kernel.dtype)
        mask[channels] = 0
        self.kernel.assign(self.kernel.numpy() * self._per_channel(mask))
        if self.bn is not None:
            # What the zero filter now outputs: its bias, or 0.
            value = 0.0 if self.bias is None else self.bias.numpy()[channels]
            _assign_at(self.bn.moving_mean, channels, value)


def _assign_at(variable, channels, value) -> None:
    array = variable.numpy()
    array[channels] = value
    variable.assign(array)
