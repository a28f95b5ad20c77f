"""`ClusterNormalization`: a norm whose statistics count merged channels.

After C-SGD, the channels of a cluster are identical; `kc.slim` keeps one
of them. A LayerNormalization (or RMS norm) over those channels took the
cluster's value as many times as the cluster has members: the slim model's
norm must too. `ClusterNormalization` weighs channel `k` by `counts[k]`,
the number of original channels it stands for, so the merge is exact.
`kc.slim` emits it in place of a `keras.layers.LayerNormalization`,
`keras.layers.RMSNormalization` or keras_hub RMS norm whose channels merge.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="keras_csgd")
class ClusterNormalization(keras.layers.Layer):
    """Layer or RMS normalization over the last axis, channels weighted.

    With `w = counts / sum(counts)`, over the last axis:

    ```python
    # rms=False (LayerNormalization)
    mean = sum(w * x)
    var = sum(w * (x - mean) ** 2)
    y = (x - mean) / sqrt(var + epsilon) * gamma + beta
    # rms=True (RMSNormalization; Gemma's has scale_offset=1)
    y = x / sqrt(sum(w * x ** 2) + epsilon) * (scale_offset + scale)
    ```

    With every count 1 this is the plain normalization. When channel `k`
    stands for `counts[k]` identical channels of a wider layer, the
    statistics equal the wider layer's: `kc.slim` builds one for every
    normalization whose channels merge.

    Args:
        counts: how many channels each channel stands for (positive
            integers, one per channel of the last axis).
        rms: RMS normalization (no mean, no `beta`) instead of layer
            normalization. Defaults to `False`.
        epsilon: added to the variance (or mean square). Defaults to
            `1e-3`.
        center: add a learned offset `beta` (layer normalization only).
            Defaults to `True`.
        scale: multiply by a learned scale. Defaults to `True`.
        scale_name: the scale's variable name (`"gamma"` as in
            LayerNormalization, `"scale"` as in RMSNormalization). Defaults
            to `"gamma"`.
        scale_offset: added to the scale (`1.0` in Gemma's RMS norms).
            Defaults to `0.0`.
        **kwargs: the base layer's arguments (`name`, `dtype`).

    Raises:
        ValueError: `counts` empty or not positive integers.

    Example:

    ```python
    norm = ClusterNormalization([2, 1, 1], epsilon=1e-6)
    norm(np.ones((2, 5, 3), "float32"))
    ```

    References:
        Ba, Kiros, Hinton. Layer Normalization. arXiv 1607.06450.
    """

    def __init__(self, counts, rms=False, epsilon=1e-3, center=True,
                 scale=True, scale_name="gamma", scale_offset=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        counts = np.asarray(counts)
        if counts.ndim != 1 or not len(counts) or (counts < 1).any() or (
                counts != np.round(counts)).any():
            raise ValueError(
                "`counts` must be positive integers, one per channel. "
                f"Received: counts={counts.tolist()!r}"
            )
        self.counts = [int(c) for c in counts]
        self.rms = bool(rms)
        self.epsilon = float(epsilon)
        self.center = bool(center) and not self.rms
        self.scale = bool(scale)
        self.scale_name = scale_name
        self.scale_offset = float(scale_offset)

    def build(self, input_shape):
        width = input_shape[-1]
        if width != len(self.counts):
            raise ValueError(
                f"`counts` has {len(self.counts)} entries for an input of "
                f"{width} channels. Received: input_shape={input_shape}"
            )
        self.gamma = self.add_weight(
            shape=(width,), initializer="ones", name=self.scale_name,
        ) if self.scale else None
        self.beta = self.add_weight(
            shape=(width,), initializer="zeros", name="beta",
        ) if self.center else None

    def call(self, inputs):
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        counts = np.asarray(self.counts, "float64")
        w = ops.convert_to_tensor(counts / counts.sum(), dtype)
        if self.rms:
            y = x * ops.rsqrt(
                ops.sum(w * ops.square(x), -1, keepdims=True) + self.epsilon)
        else:
            x = x - ops.sum(w * x, -1, keepdims=True)
            y = x * ops.rsqrt(
                ops.sum(w * ops.square(x), -1, keepdims=True) + self.epsilon)
        if self.gamma is not None:
            y = y * (self.scale_offset + ops.cast(self.gamma, dtype))
        if self.beta is not None:
            y = y + ops.cast(self.beta, dtype)
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "counts": self.counts,
                "rms": self.rms, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale,
                "scale_name": self.scale_name,
                "scale_offset": self.scale_offset}
