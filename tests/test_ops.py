"""`keras.ops` calls and traced layers in functional graphs.

Every model is checked against itself: the collapse test (each cluster's
members set equal by hand, then `slim`) matches the unpruned model's
outputs, and the slim model's MACs are those `macs_under` predicts.
"""

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import keras_csgd as kc
from keras_csgd import graph
from mac_reference import reference_macs
from utils import collapse, relative_error
from zoo import randomize


def _groups(model):
    return {g.name: g for g in kc.channel_groups(model)}


def _x(model, n=3, seed=0):
    shape = (n, *model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _slims_exactly(model, keep=0.5):
    """Collapse-then-slim matches the model; returns the slim model."""
    plan = kc.make_plan(model, keep=keep, method="kmeans")
    collapse(model, plan)
    small = kc.slim(model, plan)
    x = _x(model)
    assert relative_error(small(x), model(x)) < 1e-4
    assert kc.count_macs(small) == kc.macs_under(model, plan)
    assert kc.count_macs(small) < kc.count_macs(model)
    return small


def _split_model():
    """A CSP stage: half the channels through a block, concatenated back."""
    x = inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(x)
    a, b = ops.split(x, 2, axis=-1)
    b = L.Conv2D(4, 3, padding="same", activation="relu", name="c2")(b)
    x = ops.concatenate([a, b], axis=-1)
    x = L.Conv2D(6, 1, name="c3")(x)
    x = ops.mean(x, axis=(1, 2))
    return keras.Model(inp, L.Dense(2, name="out")(x))


def test_split_cuts_its_group_into_parts_that_prune_apart():
    model = randomize(_split_model())
    groups = _groups(model)
    assert groups["c1[0:4]"].prunable and groups["c1[4:8]"].prunable
    np.testing.assert_array_equal(
        groups["c1[4:8]"].channel_map("c1/kernel"),
        [-1, -1, -1, -1, 0, 1, 2, 3],
    )
    plan = kc.PruningPlan({"c1[0:4]": [[0], [1], [2]], "c1[4:8]": [[3]]},
                          groups=kc.channel_groups(model))
    small = kc.slim(model, plan)
    x = _x(model)
    assert small.get_layer("c1").filters == 4
    assert small.get_layer("c2").kernel.shape == (3, 3, 1, 4)
    assert small(x).shape == (3, 2)
    _slims_exactly(randomize(_split_model()))


def _elementwise_model():
    """pad, x * c, where, x[:, 1:], mean over positions, resize."""
    x = inp = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, name="c1")(x)
    x = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = ops.where(x > 0, x, 0.1 * x) * 2.0 + 1.0
    x = ops.image.resize(x, (4, 4))
    x = x[:, 1:]
    x = L.Conv2D(5, 1, name="c2")(ops.sigmoid(x) * x)
    x = ops.mean(x, axis=(1, 2), keepdims=True)
    x = ops.squeeze(x, axis=(1, 2))
    return keras.Model(inp, L.Dense(2, name="out")(x))


def test_elementwise_ops_pass_channels_and_slim_exactly():
    model = randomize(_elementwise_model())
    groups = _groups(model)
    assert groups["c1"].prunable and groups["c2"].prunable
    _slims_exactly(model)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda x: x * np.arange(6, dtype="float32"), "per-channel constant"),
        (lambda x: ops.sum(x, axis=-1, keepdims=True) + x,
         "reduction over channels"),
        (lambda x: x[..., :3], "slice of channels"),
        (lambda x: ops.transpose(x, (0, 3, 1, 2)),
         "channels on another axis than the last reach"),
        (lambda x: ops.einsum("bhwc->bhw", x), "summed over by `einsum"),
        (lambda x: ops.softmax(x), "channel-mixing softmax"),
        (lambda x: ops.flip(x, axis=-1), "unsupported operation"),
    ],
)
def test_unmapped_ops_freeze_with_a_reason(make, reason):
    x = inp = keras.Input((6, 6, 3))
    x = L.Conv2D(6, 3, padding="same", name="first")(x)
    x = L.Flatten()(make(x))
    g = _groups(keras.Model(inp, L.Dense(2)(x)))["first"]
    assert not g.prunable
    assert reason in g.reason


def _grouped_model(groups):
    x = inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 1, name="c1")(x)
    x = L.Conv2D(8, 3, groups=groups, name="grouped")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(2, name="out")(x))


def test_grouped_convolution_as_depthwise_passes_channels():
    model = randomize(_grouped_model(8))
    g = _groups(model)["c1"]
    assert g.prunable
    assert ("grouped", "grouped/kernel", 3) in g.members
    small = _slims_exactly(model)
    layer = small.get_layer("grouped")
    assert layer.groups == layer.filters == 4


def test_other_grouped_convolutions_freeze():
    g = _groups(_grouped_model(2))["c1"]
    assert not g.prunable
    assert "grouped convolution `grouped` (Conv2D): groups=2" in g.reason


def test_merge_with_a_concatenation_splits_the_other_producer():
    x = inp = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(x)
    b = L.Conv2D(4, 3, padding="same", name="b")(x)
    c = L.Conv2D(8, 1, name="c")(x)
    x = L.Add()([L.Concatenate()([a, b]), c])
    x = L.GlobalAveragePooling2D()(x)
    model = randomize(keras.Model(inp, L.Dense(2, name="out")(x)))
    groups = _groups(model)
    assert {p[0] for p in groups["a"].producers} == {"a", "c"}
    assert {p[0] for p in groups["b"].producers} == {"b", "c"}
    _slims_exactly(model)


class Block(L.Layer):
    """A composite layer: Python over sub-layers and `keras.ops`."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.expand = L.Conv2D(width, 1, name="expand")
        self.bn = L.BatchNormalization(name="bn")
        self.project = L.Conv2D(4, 1, name="project")

    def call(self, x):
        y = ops.relu(self.bn(self.expand(x)))
        return x + self.project(y * ops.mean(y, axis=(1, 2), keepdims=True))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def _block_model():
    x = inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="stem")(x)
    x = Block(8, name="block")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(2, name="out")(x))


def test_composite_layer_is_seen_through_and_rebuilt_as_its_graph(tmp_path):
    model = randomize(_block_model())
    groups = _groups(model)
    assert groups["block/expand"].prunable
    assert groups["stem"].prunable
    assert ("block/bn", "block/bn/gamma", 0) in groups["block/expand"].members
    small = _slims_exactly(model)
    block = small.get_layer("block")
    assert isinstance(block, keras.Model)
    assert block.get_layer("expand").filters == 4
    path = tmp_path / "slim.keras"
    small.save(path)
    x = _x(model)
    loaded = keras.saving.load_model(path, safe_mode=False)
    assert relative_error(loaded(x), small(x)) == 0.0


def test_lambda_of_ops_is_seen_through():
    x = inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, name="c1")(x)
    x = L.Lambda(lambda t: ops.relu(t) * 2.0, name="double")(x)
    x = L.GlobalAveragePooling2D()(x)
    assert _groups(keras.Model(inp, L.Dense(2)(x)))["c1"].prunable


class BatchScaled(L.Layer):
    """Reads the batch size in Python: its trace would bake in `None`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(4, 1, name="conv")

    def call(self, x):
        return self.conv(x) * float(x.shape[0] or 1)


class ListedScale(L.Layer):
    """Uses a variable of its own that no attribute holds: not traced."""

    def build(self, input_shape):
        self.scales = [self.add_weight(shape=(input_shape[-1],),
                                       name="scale")]

    def call(self, x):
        return x * self.scales[0]


@pytest.mark.parametrize(
    "layer, reason",
    [
        (ListedScale, "unsupported layer `odd` (ListedScale): its call uses "
         "the variable scale as a constant"),
        (BatchScaled, "unsupported layer `odd` (BatchScaled): its traced "
         "graph computes something else"),
    ],
)
def test_layers_that_cannot_be_traced_freeze(layer, reason):
    x = inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, name="c1")(x)
    x = L.GlobalAveragePooling2D()(layer(name="odd")(x))
    g = _groups(keras.Model(inp, L.Dense(2)(x)))["c1"]
    assert not g.prunable
    assert reason in g.reason


def test_a_layout_narrower_than_its_output_freezes():
    # One channel broadcast to four by a constant: the merge's layout (one
    # channel) does not describe its output.
    x = inp = keras.Input((6, 6, 3))
    x = L.Conv2D(1, 3, name="c1")(x) * np.arange(4, dtype="float32")
    x = L.GlobalAveragePooling2D()(L.Conv2D(5, 1, name="c2")(x))
    groups = _groups(keras.Model(inp, L.Dense(2)(x)))
    assert not groups["c1"].prunable
    assert "a layout of 1 channels for an output of 4" in groups["c1"].reason
    assert groups["c2"].prunable


def _attention_model(contract):
    """Heads made by reshapes and transposes, scores by `contract`."""
    x = inp = keras.Input((6, 8))
    q, k, v = (L.Dense(8, name=n)(x) for n in "qkv")

    def heads(t):
        return ops.transpose(ops.reshape(t, (-1, 6, 2, 4)), (0, 2, 1, 3))

    scores = contract(heads(q), heads(k))
    x = ops.matmul(ops.softmax(scores * 0.5, axis=-1), heads(v))
    x = ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (-1, 6, 8))
    x = L.GlobalAveragePooling1D()(L.Dense(8, name="proj")(x))
    return keras.Model(inp, L.Dense(2, name="out")(x))


@pytest.mark.parametrize("contract", [
    lambda q, k: ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))),
    lambda q, k: ops.einsum("bhqd,bhkd->bhqk", q, k),
])
def test_heads_of_a_reshaped_projection_prune(contract):
    model = randomize(_attention_model(contract))
    groups = kc.channel_groups(model)
    by_producers = {tuple(sorted({p[0] for p in g.producers})): g
                    for g in groups if g.size < 8}
    heads, size = by_producers[("k", "q", "v")], by_producers[("v",)]
    assert heads.prunable and heads.size == 2
    assert size.prunable and size.size == 4
    assert ("proj", "proj/kernel", 0) in heads.consumers
    contracted = by_producers[("k", "q")]  # the query/key head size
    assert contracted.prunable and not contracted.exact
    assert "contracted between two computed tensors" in contracted.prune_only
    x = _x(model, n=1)
    assert kc.count_macs(model) == reference_macs(model, x)
    small = _slims_exactly(model)
    assert small.get_layer("proj").kernel.shape[0] == 2


class Tokens(L.Layer):
    """A class token tiled to the batch and a position embedding."""

    def build(self, input_shape):
        self.proj = L.Dense(8, name="proj")
        self.proj.build(input_shape)
        self.token = self.add_weight(shape=(1, 1, 8), name="token")
        self.position = self.add_weight(shape=(1, 7, 8), name="position")

    def call(self, x):
        token = ops.tile(self.token, (ops.shape(x)[0], 1, 1))
        return ops.concatenate([token, self.proj(x)], axis=1) + self.position


def _tokens_model():
    x = inp = keras.Input((6, 4))
    x = Tokens(name="tokens")(x)
    x = L.GlobalAveragePooling1D()(L.Dense(5, name="mix")(x))
    return keras.Model(inp, L.Dense(2, name="out")(x))


def test_variables_of_a_traced_layer_are_members(tmp_path):
    model = randomize(_tokens_model())
    group = _groups(model)["tokens/proj"]
    assert group.prunable
    assert {m[1] for m in group.members} >= {
        "tokens/token", "tokens/position", "tokens/proj/kernel"}
    small = _slims_exactly(model)
    tokens = small.get_layer("tokens")
    assert tokens.get_layer("token").value.shape == (1, 1, 4)
    path = tmp_path / "slim.keras"
    small.save(path)
    x = _x(model)
    loaded = keras.saving.load_model(path)
    assert relative_error(loaded(x), small(x)) == 0.0


class Windows(L.Layer):
    """Attention-free windows of an image: the batch size read in Python
    and divided (Swin's window partition), a block returning `None`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = Pair(name="inner")

    def call(self, x):
        batch, c = ops.shape(x)[0], x.shape[-1]
        w = ops.reshape(x, (batch, 2, 2, 2, 2, c))
        w = ops.reshape(ops.transpose(w, (0, 1, 3, 2, 4, 5)), (-1, 4, c))
        w, _ = self.inner(w)
        w = ops.reshape(w, (ops.shape(w)[0] // 4, 2, 2, 2, 2, c))
        return ops.reshape(ops.transpose(w, (0, 1, 3, 2, 4, 5)),
                           (batch, 4, 4, c))


class Pair(L.Layer):
    """Returns its output and `None`, as DeiT's encoder blocks do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.up = L.Dense(6, activation="relu", name="up")
        self.down = L.Dense(4, name="down")

    def call(self, x):
        return self.down(self.up(x)), None


def test_windows_of_the_batch_and_none_outputs_are_traced():
    x = inp = keras.Input((4, 4, 3))
    x = L.Conv2D(4, 1, name="stem")(x)
    x = x + Windows(name="windows")(x)
    model = randomize(keras.Model(inp, L.Dense(2, name="out")(
        L.GlobalAveragePooling2D()(x))))
    groups = _groups(model)
    assert groups["windows/inner/up"].prunable
    assert groups["stem"].prunable
    assert kc.count_macs(model) == reference_macs(model, _x(model, n=1))
    _slims_exactly(model)


def test_a_grid_layout_selects_and_sums_by_both_sides():
    an = type("Analysis", (), {"sizes": {0: 2, 1: 3}, "gid_of": {
        "a": 0, "b": 1}})()
    plan = kc.PruningPlan({"a": [[1]], "b": [[0, 2], [1]]})
    index = graph.Reindex(an, plan)
    lay = ("grid", ("leaf", 0), ("leaf", 1))
    np.testing.assert_array_equal(index.select(lay), [3, 4])
    np.testing.assert_array_equal(index.assign(lay),
                                  [-1, -1, -1, 0, 1, 0])


def _rotary_attention_model():
    """DINOv3's attention: heads on their own axis, half of the query and
    key head size rotated (sliced on the last axis), and
    `ops.dot_product_attention`."""
    x = inp = keras.Input((6, 8))
    q, k, v = (ops.reshape(L.Dense(8, name=n)(x), (-1, 6, 2, 4))
               for n in "qkv")

    def rotated(t):
        return t + ops.concatenate([-t[..., 2:], t[..., :2]], axis=-1)

    x = ops.nn.dot_product_attention(rotated(q), rotated(k), v)
    x = L.Dense(8, name="proj")(ops.reshape(x, (-1, 6, 8)))
    return keras.Model(inp, L.Dense(2, name="out")(
        L.GlobalAveragePooling1D()(x)))


def test_dot_product_attention_prunes_heads():
    model = randomize(_rotary_attention_model())
    groups = kc.channel_groups(model)
    by_producers = {tuple(sorted({p[0] for p in g.producers})): g
                    for g in groups if g.size < 8}
    heads = by_producers[("k", "q", "v")]
    assert heads.prunable and heads.exact and heads.size == 2
    assert "slice of channels" in by_producers[("k", "q")].reason
    assert "value head size" in by_producers[("v",)].reason
    assert kc.count_macs(model) == reference_macs(model, _x(model, n=1))
    small = _slims_exactly(model)
    assert small.get_layer("proj").kernel.shape[0] == 4


class FoldedHeads(L.Layer):
    """ViTDet's blocks: heads folded into the batch axis (`(3, batch *
    heads, n, d)`), and an MLP `Sequential` built for any length."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.qkv = L.Dense(24, name="qkv")
        self.mlp = keras.Sequential(
            [L.Dense(6, activation="relu", name="up"), L.Dense(8, name="down")],
            name="mlp")

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.mlp.build((None, None, 8))

    def call(self, x):
        batch, n = ops.shape(x)[0], x.shape[1]
        qkv = ops.reshape(self.qkv(x), (batch, n, 3, 2, 4))
        qkv = ops.reshape(ops.transpose(qkv, (2, 0, 3, 1, 4)),
                          (3, batch * 2, n, 4))
        q, k, v = ops.unstack(qkv, axis=0)
        scores = ops.softmax(ops.matmul(q, ops.transpose(k, (0, 2, 1))))
        x = ops.reshape(ops.matmul(scores, v), (batch, 2, n, 4))
        x = ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (batch, n, 8))
        return x + self.mlp(x)


def test_heads_folded_into_the_batch_and_nested_models_are_counted():
    x = inp = keras.Input((6, 8))
    x = FoldedHeads(name="folded")(x)
    model = randomize(keras.Model(inp, L.Dense(2, name="out")(
        L.GlobalAveragePooling1D()(x))))
    assert _groups(model)["folded/mlp/up"].prunable
    assert kc.count_macs(model) == reference_macs(model, _x(model, n=1))
    _slims_exactly(model)
