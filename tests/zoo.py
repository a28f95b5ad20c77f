"""Small functional models covering the layer patterns slimming must handle."""

import keras
import numpy as np
from keras import layers as L

from keras_csgd.models import resnet_cifar


def plain_cnn():
    x = inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, name="c1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(6, 3, padding="same", name="c2")(x)
    x = L.PReLU(name="prelu")(x)
    x = L.Flatten()(x)
    x = L.Dense(12, activation="relu", name="fc1")(x)
    x = L.Dropout(0.2)(x)
    return keras.Model(inp, L.Dense(4, name="out")(x), name="plain_cnn")


def bottleneck_resnet():
    x = inp = keras.Input((16, 16, 3))
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU()(x)
    for b, stride in enumerate((1, 2)):
        y = L.Conv2D(8, 1, name=f"b{b}_1")(x)
        y = L.BatchNormalization(name=f"b{b}_bn1")(y)
        y = L.ReLU()(y)
        y = L.Conv2D(8, 3, strides=stride, padding="same", name=f"b{b}_2")(y)
        y = L.BatchNormalization(name=f"b{b}_bn2")(y)
        y = L.ReLU()(y)
        y = L.Conv2D(32, 1, name=f"b{b}_3")(y)
        y = L.BatchNormalization(name=f"b{b}_bn3")(y)
        s = L.Conv2D(32, 1, strides=stride, name=f"b{b}_proj")(x)
        s = L.BatchNormalization(name=f"b{b}_pbn")(s)
        x = L.ReLU()(L.Add()([s, y]))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(5)(x), name="bottleneck")


def preact_resnet():
    x = inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(x)
    for b in range(2):
        y = L.BatchNormalization(name=f"p{b}_bn1")(x)
        y = L.ReLU()(y)
        y = L.Conv2D(8, 3, padding="same", name=f"p{b}_c1")(y)
        y = L.BatchNormalization(name=f"p{b}_bn2")(y)
        y = L.ReLU()(y)
        y = L.Conv2D(8, 3, padding="same", name=f"p{b}_c2")(y)
        x = L.Add(name=f"p{b}_add")([x, y])
    x = L.BatchNormalization(name="final_bn")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="preact")


def inverted_residual():
    x = inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", name="stem")(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    y = L.Conv2D(24, 1, name="expand")(x)
    y = L.BatchNormalization()(y)
    y = L.ReLU(6.0)(y)
    y = L.DepthwiseConv2D(3, padding="same", name="dw")(y)
    y = L.BatchNormalization()(y)
    y = L.ReLU(6.0)(y)
    y = L.Conv2D(8, 1, name="project")(y)
    y = L.BatchNormalization()(y)
    x = L.Add()([x, y])
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw2")(x)
    x = L.BatchNormalization(name="dw2_bn")(x)
    x = L.SeparableConv2D(12, 3, depth_multiplier=2, padding="same",
                          name="sep")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="mbv2")


def dense_block():
    x = inp = keras.Input((12, 12, 3))
    x = L.Conv2D(6, 3, padding="same", name="stem")(x)
    for i in range(3):
        y = L.BatchNormalization(name=f"d{i}_bn")(x)
        y = L.ReLU()(y)
        y = L.Conv2D(4, 3, padding="same", name=f"d{i}_conv")(y)
        x = L.Concatenate(name=f"d{i}_cat")([x, y])
    x = L.BatchNormalization(name="t_bn")(x)
    x = L.Conv2D(8, 1, name="transition")(x)
    x = L.AveragePooling2D(2)(x)
    x = L.Flatten()(L.Concatenate()([x, x]))
    return keras.Model(inp, L.Dense(3)(x), name="densenet")


def se_block():
    x = inp = keras.Input((12, 12, 3))
    x = L.Conv2D(16, 3, padding="same", name="c1")(x)
    x = L.BatchNormalization()(x)
    x = L.Activation("swish")(x)
    s = L.GlobalAveragePooling2D()(x)
    s = L.Dense(4, activation="relu", name="se_reduce")(s)
    s = L.Dense(16, activation="sigmoid", name="se_expand")(s)
    s = L.Reshape((1, 1, 16))(s)
    x = L.Multiply(name="se_mul")([x, s])
    x = L.Conv2D(8, 1, name="c2")(x)
    x = L.GlobalMaxPooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="se")


def nested():
    inner_in = keras.Input((10, 10, 8))
    y = L.Conv2D(8, 3, padding="same", name="ic")(inner_in)
    y = L.BatchNormalization(name="ibn")(y)
    inner = keras.Model(inner_in, L.ReLU()(y), name="inner")
    seq = keras.Sequential(
        [keras.Input((10, 10, 8)), L.Conv2D(6, 1, name="sc"),
         L.BatchNormalization(name="sbn")],
        name="seq",
    )
    x = inp = keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, padding="same", name="c0")(x)
    x = inner(x)
    x = seq(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(2)(x), name="nested")


def sequential_cnn():
    return keras.Sequential(
        [keras.Input((8, 8, 1)), L.Conv2D(8, 3, name="s1"),
         L.BatchNormalization(name="sb"), L.ReLU(), L.Conv2D(6, 3, name="s2"),
         L.Flatten(), L.Dense(3, name="sd")],
        name="seqcnn",
    )


def conv1d_transpose():
    x = inp = keras.Input((16, 4))
    x = L.Conv1D(8, 3, padding="same", name="k1")(x)
    x = L.BatchNormalization()(x)
    x = L.Conv1D(6, 1, name="k2")(x)
    y = L.Reshape((4, 4, 6))(x)
    y = L.Conv2DTranspose(5, 3, strides=2, padding="same", name="tr")(y)
    y = L.UpSampling2D()(y)
    y = L.Cropping2D(1)(y)
    y = L.ZeroPadding2D(1)(y)
    y = L.Conv2D(4, 3, name="after")(y)
    y = L.GlobalAveragePooling2D()(y)
    return keras.Model(inp, L.Dense(2)(y), name="conv1d_tr")


def vit(image=16, patch=4, dim=32, heads=4, mlp=48, depth=2, classes=5):
    """A small functional ViT: patch Conv2D, pre-norm MultiHeadAttention and
    Dense-gelu-Dense MLP blocks, LayerNormalization, mean-pooled head."""
    x = inp = keras.Input((image, image, 3))
    x = L.Conv2D(dim, patch, strides=patch, name="patch")(x)
    x = L.Reshape(((image // patch) ** 2, dim))(x)
    for b in range(depth):
        y = L.LayerNormalization(name=f"t{b}_ln1")(x)
        y = L.MultiHeadAttention(heads, dim // heads, name=f"t{b}_mha")(y, y)
        x = L.Add()([x, y])
        y = L.LayerNormalization(name=f"t{b}_ln2")(x)
        y = L.Dense(mlp, activation="gelu", name=f"t{b}_fc1")(y)
        x = L.Add()([x, L.Dense(dim, name=f"t{b}_fc2")(y)])
    x = L.LayerNormalization(name="ln")(x)
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(classes, name="head")(x), name="vit")


def randomize(model, seed=0):
    """Random weights everywhere, BN statistics included (non-trivial BN)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        name = v.path.rsplit("/", 1)[-1]
        if name in ("moving_variance", "gamma"):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(v.dtype))
        elif name in ("moving_mean", "beta", "bias"):
            v.assign(rng.normal(0, 0.1, v.shape).astype(v.dtype))
        else:
            fan = max(1, int(np.prod(v.shape[:-1])))
            v.assign(rng.normal(0, 1 / np.sqrt(fan), v.shape).astype(v.dtype))
    return model


ZOO = {
    "plain_cnn": plain_cnn,
    "resnet20": lambda: resnet_cifar(20, input_shape=(16, 16, 3)),
    "bottleneck": bottleneck_resnet,
    "preact": preact_resnet,
    "mbv2": inverted_residual,
    "densenet": dense_block,
    "se": se_block,
    "nested": nested,
    "sequential": sequential_cnn,
    "conv1d_transpose": conv1d_transpose,
    "vit": vit,
}
