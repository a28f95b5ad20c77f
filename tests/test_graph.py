"""Channel-group analysis: groups, members, consumers and frozen reasons."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc
import zoo
from keras_csgd.models import resnet_cifar


def _by_name(model):
    return {g.name: g for g in kc.channel_groups(model)}


def test_resnet56_residual_groups_are_coupled():
    groups = _by_name(resnet_cifar(56))
    stage1 = groups["stem_conv"]
    producers = {p[0] for p in stage1.producers}
    assert producers == {"stem_conv"} | {f"s1b{b}_2_conv" for b in range(1, 10)}
    stage2 = groups["s2b1_2_conv"]
    assert {p[0] for p in stage2.producers} == (
        {"s2b1_proj_conv"} | {f"s2b{b}_2_conv" for b in range(1, 10)}
    )
    # Every BN of the stage is a member; consumers are the blocks' first
    # convs, the next stage's first conv and projection.
    bn_members = {m[0] for m in stage1.members if m[0].endswith("_bn")}
    assert "stem_bn" in bn_members and "s1b9_2_bn" in bn_members
    assert {c[0] for c in stage1.consumers} == (
        {f"s1b{b}_1_conv" for b in range(1, 10)}
        | {"s2b1_1_conv", "s2b1_proj_conv"}
    )
    assert groups["logits"].prunable is False
    assert "model output" in groups["logits"].reason
    assert groups["input:image"].reason == "model input"


def test_members_cover_every_per_channel_variable():
    groups = _by_name(zoo.plain_cnn())
    c1 = groups["c1"]
    paths = {m[1].split("/", 1)[1] for m in c1.members}
    assert paths == {"kernel", "bias", "gamma", "beta", "moving_mean",
                     "moving_variance"}
    assert ("c1", "c1/kernel", 3) in c1.producers
    # Flatten -> Dense: the consumer is the dense kernel's input axis.
    c2 = groups["c2"]
    assert ("prelu", "prelu/alpha", 2) in c2.members
    assert ("fc1", "fc1/kernel", 0) in c2.consumers


def test_concatenate_maps_shifted_ranges():
    model = zoo.dense_block()
    groups = _by_name(model)
    stem = groups["stem"]
    cmap = stem.channel_map("t_bn/gamma")
    # t_bn reads [stem(6), d0(4), d1(4), d2(4)].
    np.testing.assert_array_equal(cmap[:6], np.arange(6))
    assert (cmap[6:] == -1).all()
    d1 = groups["d1_conv"].channel_map("t_bn/gamma")
    np.testing.assert_array_equal(np.flatnonzero(d1 >= 0), np.arange(10, 14))


def test_depth_multiplier_repeats_channels():
    groups = _by_name(zoo.inverted_residual())
    stem = groups["stem"]
    # dw2 has depth multiplier 2: its bias holds each channel twice.
    np.testing.assert_array_equal(
        stem.channel_map("dw2/bias"), np.repeat(np.arange(8), 2)
    )
    assert ("dw2", "dw2/kernel", 2) in stem.members


def test_se_multiply_joins_the_excitation_producer():
    groups = _by_name(zoo.se_block())
    c1 = groups["c1"]
    assert {p[0] for p in c1.producers} == {"c1", "se_expand"}
    assert ("se_reduce", "se_reduce/kernel", 0) in c1.consumers


def test_nested_and_sequential_models():
    groups = _by_name(zoo.nested())
    assert {"c0", "inner/ic", "seq/sc"} <= set(groups)
    assert groups["inner/ic"].producers == (
        ("inner/ic", "ic/kernel", 3),
    )
    seq = _by_name(zoo.sequential_cnn())
    assert seq["s1"].prunable and seq["s2"].prunable


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda x: L.LayerNormalization(axis=[-2, -1])(x),
         "LayerNormalization over channels and other axes"),
        (lambda x: L.Reshape((6, 16, 3))(x), "reshape over channels"),
        (lambda x: L.Lambda(lambda t: keras.ops.flip(t, axis=-1))(x),
         "unsupported operation"),
        (lambda x: L.Softmax()(x), "channel-mixing"),
    ],
)
def test_frozen_reasons(make, reason):
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", name="first")(inp)
    x = make(x)
    x = L.Flatten()(x)
    model = keras.Model(inp, L.Dense(2)(x))
    g = _by_name(model)["first"]
    assert not g.prunable
    assert reason in g.reason


def test_shared_layer_is_frozen():
    inp = keras.Input((6, 6, 3))
    conv = L.Conv2D(3, 3, padding="same", name="shared")
    x = conv(conv(inp))
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    for g in kc.channel_groups(model):
        if g.name.startswith("shared"):
            assert not g.prunable and "shared" in g.reason


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    with pytest.raises(ValueError, match="Net is a subclassed model"):
        kc.channel_groups(Net())
    with pytest.raises(TypeError, match="must be a keras.Model"):
        kc.channel_groups("model")


def test_group_dict_round_trip():
    for g in kc.channel_groups(zoo.dense_block()):
        back = kc.ChannelGroup.from_dict(g.to_dict())
        assert back.to_dict() == g.to_dict()


def test_a_layers_own_softmax_freezes_its_output_group():
    # Pruning units of Dense(softmax) changes every other unit's output.
    inp = keras.Input((6,))
    h = L.Dense(5, activation="softmax", name="mix")(inp)
    out = L.Dense(3, name="out")(h)
    groups = {g.name: g for g in kc.channel_groups(keras.Model(inp, out))}
    assert not groups["mix"].prunable
    assert "channel-mixing activation in `mix`" in groups["mix"].reason
    inp = keras.Input((6,))
    h = L.Dense(5, activation="relu", name="mix")(inp)
    model = keras.Model(inp, L.Dense(3, name="out")(h))
    assert {g.name: g for g in kc.channel_groups(model)}["mix"].prunable
