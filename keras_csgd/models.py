"""Reference models: CIFAR ResNets (He et al. 2016) and a small residual CNN.

The CIFAR ResNets follow the C-SGD reference code: a 3x3 stem of 16 filters,
three stages of `n = (depth - 2) / 6` basic blocks with 16/32/64 filters,
projection shortcuts (1x1 conv + BN) where the shape changes, global average
pooling and a dense classifier.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


def _conv_bn(x, filters, kernel, strides, name, relu=True):
    x = layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(
        momentum=0.9, epsilon=1e-5, name=f"{name}_bn"
    )(x)
    if relu:
        x = layers.ReLU(name=f"{name}_relu")(x)
    return x


def resnet_cifar(
    depth: int = 20,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    widths: tuple[int, int, int] = (16, 32, 64),
    name: str | None = None,
    mean=None,
    std=None,
) -> keras.Model:
    """CIFAR ResNet-`depth` (20, 32, 44, 56, 110, ...), functional.

    Args:
        depth: `6 n + 2` layers. Defaults to `20`.
        num_classes: classifier width. Defaults to `10`.
        input_shape: image shape, channels last. Defaults to `(32, 32, 3)`.
        widths: filters of the three stages. Defaults to `(16, 32, 64)`.
        name: model name. Defaults to `resnet{depth}`.
        mean: per-channel mean of the inputs; with `std`, a
            `Normalization` layer (`"normalize"`) first, so that the model
            takes images as they are (e.g. in `[0, 1]`). Defaults to `None`
            (the inputs are expected normalised).
        std: per-channel standard deviation, with `mean`. Defaults to
            `None`.

    Returns:
        An unbuilt-weights (randomly initialised) `keras.Model`.

    Raises:
        ValueError: if `depth` is not `6 n + 2`.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            "`depth` must be 6n+2 (20, 32, 44, 56, 110). "
            f"Received: depth={depth}"
        )
    if (mean is None) != (std is None):
        raise ValueError(
            "`mean` and `std` must be given together. "
            f"Received: mean={mean}, std={std}"
        )
    n = (depth - 2) // 6
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    if mean is not None:
        x = layers.Normalization(
            mean=mean, variance=np.square(std), name="normalize"
        )(x)
    x = _conv_bn(x, widths[0], 3, 1, "stem")
    for s, w in enumerate(widths):
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            pre = f"s{s + 1}b{b + 1}"
            y = _conv_bn(x, w, 3, stride, f"{pre}_1")
            y = _conv_bn(y, w, 3, 1, f"{pre}_2", relu=False)
            if stride != 1 or x.shape[-1] != w:
                x = _conv_bn(x, w, 1, stride, f"{pre}_proj", relu=False)
            x = layers.Add(name=f"{pre}_add")([x, y])
            x = layers.ReLU(name=f"{pre}_out")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def small_resnet(
    input_shape: tuple[int, int, int] = (8, 8, 1),
    num_classes: int = 10,
    width: int = 16,
    name: str = "small_resnet",
) -> keras.Model:
    """A small residual CNN (the `keras-csgd demo` model on 8x8 digits).

    Stem conv, two residual blocks (the second with a 1x1 projection to
    `2 * width`), global average pooling and a dense classifier.
    """
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, width, 3, 1, "stem")
    y = _conv_bn(x, width, 3, 1, "b1_1")
    y = _conv_bn(y, width, 3, 1, "b1_2", relu=False)
    x = layers.ReLU(name="b1_out")(layers.Add(name="b1_add")([x, y]))
    y = _conv_bn(x, 2 * width, 3, 2, "b2_1")
    y = _conv_bn(y, 2 * width, 3, 1, "b2_2", relu=False)
    s = _conv_bn(x, 2 * width, 1, 2, "b2_proj", relu=False)
    x = layers.ReLU(name="b2_out")(layers.Add(name="b2_add")([s, y]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def lenet_300_100(
    input_dim: int = 64, num_classes: int = 10, name: str = "lenet_300_100"
) -> keras.Model:
    """LeNet-300-100 (LeCun et al. 1998): the GSM paper's MLP.

    Two hidden ReLU layers of 300 and 100 units and a linear classifier
    (logits). Defaults fit scikit-learn's 8x8 digits, flattened.
    """
    return keras.Sequential(
        [
            keras.Input((input_dim,)),
            layers.Dense(300, activation="relu"),
            layers.Dense(100, activation="relu"),
            layers.Dense(num_classes),
        ],
        name=name,
    )
