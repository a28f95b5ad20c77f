"""`slim`: identity plans, the collapse test, constant folding, blocks."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc
from utils import collapse, relative_error
from zoo import ZOO, randomize


def _inputs(model, n=3, seed=0):
    shape = [n] + list(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _identity_plan(model):
    groups = kc.channel_groups(model)
    clusters = {g.name: [[i] for i in range(g.size)]
                for g in groups if g.prunable}
    return kc.PruningPlan(clusters, groups=groups)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_identity_plan_is_exact(name):
    model = randomize(ZOO[name]())
    x = _inputs(model)
    small = kc.slim(model, _identity_plan(model))
    np.testing.assert_array_equal(small(x), model(x))
    assert kc.count_macs(small) == kc.count_macs(model)
    assert [layer.name for layer in small.layers] == [
        layer.name for layer in model.layers
    ]


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("method", ["even", "kmeans"])
def test_collapsed_model_slims_exactly(name, method):
    model = randomize(ZOO[name]())
    plan = kc.make_plan(model, keep=0.6, method=method)
    collapse(model, plan)
    x = _inputs(model)
    small = kc.slim(model, plan)
    assert relative_error(small(x), model(x)) < 1e-4
    assert kc.count_macs(small) < kc.count_macs(model)
    assert small.count_params() < model.count_params()
    out_layers = [t._keras_history.operation.name for t in model.outputs]
    assert [t._keras_history.operation.name for t in small.outputs] == (
        out_layers
    )


def test_macs_match_hand_count():
    model = ZOO["plain_cnn"]()
    # c1 3x3x3->8 on 10x10, c2 3x3x8->6 on 5x5, fc1 150->12, out 12->4.
    full = 100 * 9 * 3 * 8 + 25 * 9 * 8 * 6 + 150 * 12 + 12 * 4
    assert kc.count_macs(model) == full
    plan = kc.PruningPlan({"c1": [[0, 1], [2], [3]], "c2": [[0], [1]]},
                          groups=kc.channel_groups(model))
    small = kc.slim(model, plan)
    assert small.get_layer("c1").filters == 3
    assert small.get_layer("fc1").kernel.shape == (25 * 2, 12)
    slim_macs = 100 * 9 * 3 * 3 + 25 * 9 * 3 * 2 + 50 * 12 + 12 * 4
    assert kc.count_macs(small) == slim_macs


def test_consumer_sums_cluster_slices():
    inp = keras.Input((4,))
    h = L.Dense(3, name="h")(inp)
    model = keras.Model(inp, L.Dense(2, name="o")(h))
    randomize(model)
    plan = kc.PruningPlan({"h": [[0, 2], [1]]},
                          groups=kc.channel_groups(model))
    small = kc.slim(model, plan)
    w = model.get_layer("o").kernel.numpy()
    np.testing.assert_allclose(
        small.get_layer("o").kernel.numpy(), [w[0] + w[2], w[1]]
    )
    np.testing.assert_allclose(
        small.get_layer("h").kernel.numpy(),
        model.get_layer("h").kernel.numpy()[:, [0, 1]],
    )


def _zero_filters(model, group, channels):
    for _, path, axis in group.producers:
        var = next(v for v in model.weights if v.path == path)
        w = np.moveaxis(var.numpy(), axis, 0).copy()
        w[channels] = 0
        var.assign(np.moveaxis(w, 0, axis))


def _soft_pruned_plan(model, name, removed):
    groups = {g.name: g for g in kc.channel_groups(model)}
    g = groups[name]
    _zero_filters(model, g, removed)
    keep = [[i] for i in range(g.size) if i not in removed]
    return kc.PruningPlan({name: keep}, groups=list(groups.values()))


@pytest.mark.parametrize("consumer", ["conv1x1", "dense", "gap"])
def test_zeroed_channels_fold_exactly(consumer):
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="p")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    if consumer == "conv1x1":
        x = L.Conv2D(4, 1, use_bias=False, name="c")(x)
        x = L.Flatten()(x)
    elif consumer == "dense":
        x = L.Flatten()(x)
    else:
        x = L.GlobalAveragePooling2D()(x)
    model = randomize(keras.Model(inp, L.Dense(3, name="out")(x)))
    plan = _soft_pruned_plan(model, "p", [1, 4, 6])
    x = _inputs(model)
    small = kc.slim(model, plan)
    assert small.get_layer("p").filters == 5
    assert relative_error(small(x), model(x)) < 1e-5


def test_zeroed_channels_at_padded_borders_within_bound():
    """A 3x3 'same' consumer: only border outputs differ, within the bound."""
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", name="p")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(4, 3, padding="same", name="c")(x)
    model = randomize(keras.Model(inp, L.ReLU()(x)))
    removed = [2, 5]
    plan = _soft_pruned_plan(model, "p", removed)
    feats = keras.Model(model.input, model.get_layer("c").output)
    small = kc.slim(model, plan)
    small_feats = keras.Model(small.input, small.get_layer("c").output)
    x = _inputs(model)
    diff = np.abs(small_feats(x) - feats(x))
    interior = diff[:, 1:-1, 1:-1]
    assert interior.max() < 1e-5
    bn = model.get_layer("bn")
    gamma, beta, mean, var = (w.numpy() for w in bn.weights)
    bias = model.get_layer("p").bias.numpy()
    const = gamma * (bias - mean) / np.sqrt(var + bn.epsilon) + beta
    taps = np.abs(model.get_layer("c").kernel.numpy()[:, :, removed])
    bound = (np.abs(const[removed])[None, None, :, None] * taps).sum()
    assert 0 < diff.max() <= bound + 1e-6


def test_remove_blocks_replaces_add_by_shortcut():
    model = randomize(ZOO["resnet20"]())
    # Close the second block's branch: its last BN outputs zero.
    bn = model.get_layer("s1b2_2_bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma * 0, beta * 0, mean, var])
    small = kc.slim(model, kc.PruningPlan({}), remove_blocks=["s1b2_add"])
    names = {layer.name for layer in small.layers}
    assert "s1b2_add" not in names and "s1b2_1_conv" not in names
    x = _inputs(model)
    assert relative_error(small(x), model(x)) < 1e-5
    assert kc.count_macs(small) < kc.count_macs(model)


def test_remove_blocks_bad_name():
    model = ZOO["resnet20"]()
    with pytest.raises(ValueError, match="remove_blocks"):
        kc.slim(model, kc.PruningPlan({}), remove_blocks=["stem_conv"])


def test_slim_rejects_non_plans_and_frozen_groups():
    model = ZOO["plain_cnn"]()
    with pytest.raises(TypeError, match="`plan` must be a kc.PruningPlan"):
        kc.slim(model, {"c1": [[0]]})
    with pytest.raises(ValueError, match="is frozen"):
        kc.slim(model, kc.PruningPlan({"out": [[0]]}))


def test_slim_leaves_the_input_model_unchanged():
    model = randomize(ZOO["bottleneck"]())
    before = [w.copy() for w in model.get_weights()]
    kc.slim(model, kc.make_plan(model, keep=0.5))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_slim_of_a_compiled_csgd_model_comes_back_uncompiled():
    model = ZOO["plain_cnn"]()
    plan = kc.make_plan(model, keep=0.5)
    model.compile(optimizer=kc.CSGD(plan), loss="mse")
    model.optimizer.build(model.trainable_variables)
    small = kc.slim(model, plan)
    assert not small.compiled and model.compiled


@pytest.mark.parametrize("name", sorted(ZOO))
def test_macs_under_a_plan_equal_the_slim_models_count(name):
    # Independent reference: count the slim model that `slim` builds.
    model = randomize(ZOO[name]())
    plan = kc.make_plan(model, keep=0.5)
    with pytest.warns(UserWarning, match="not identical"):
        small = kc.slim(model, plan)
    assert kc.macs_under(model, plan) == kc.count_macs(small)


def test_plan_blocks_are_removed_by_slim_and_round_trip_json():
    model = randomize(ZOO["resnet20"]())
    bn = model.get_layer("s1b2_2_bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma * 0, beta * 0, mean, var])
    groups = kc.channel_groups(model)
    plan = kc.PruningPlan({}, groups=groups, remove_blocks=["s1b2_add"])
    again = kc.PruningPlan.from_json(plan.to_json())
    assert again.remove_blocks == ("s1b2_add",)
    assert again == plan
    small = kc.slim(model, again)
    assert "s1b2_add" not in {layer.name for layer in small.layers}
    x = _inputs(model)
    assert relative_error(small(x), model(x)) < 1e-5
    assert kc.macs_under(model, plan) == kc.count_macs(small)


def test_slim_warns_or_raises_on_clusters_that_have_not_collapsed():
    model = randomize(ZOO["plain_cnn"]())
    plan = kc.make_plan(model, keep=0.5)
    with pytest.warns(UserWarning, match=r"group 'c\w+'"):
        kc.slim(model, plan)
    with pytest.raises(ValueError, match="strict=True"):
        kc.slim(model, plan, strict=True)
    collapse(model, plan)
    small = kc.slim(model, plan, strict=True)  # collapsed: no error
    x = _inputs(model)
    assert relative_error(small(x), model(x)) < 1e-4


def test_slim_reuses_the_analysis_of_the_plan(monkeypatch):
    model = randomize(ZOO["plain_cnn"]())
    plan = kc.make_plan(model, keep=0.5)
    collapse(model, plan)
    assert plan.made_for(model) is not None
    calls = []
    real = kc.graph.analyze
    monkeypatch.setattr(kc.graph, "analyze",
                        lambda m: calls.append(m) or real(m))
    kc.slim(model, plan)
    assert calls == []
    assert plan.made_for(ZOO["plain_cnn"]()) is None


class _AutoNamedScale(L.Layer):
    """A custom layer whose weight gets an automatic name (`variable_N`)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=input_shape[-1:])

    def call(self, x):
        return x * self.scale


def test_weights_of_auto_named_variables_survive_slim():
    # ConvNeXt's LayerScale: a copy's variable is `variable_N`, another N.
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = L.Conv2D(4, 1, name="c2")(L.ReLU()(x))
    x = _AutoNamedScale(name="scale")(x)
    model = randomize(keras.Model(inp, x))
    model.get_layer("scale").scale.assign(np.arange(1.0, 5.0))
    plan = kc.make_plan(model, keep=0.5)
    collapse(model, plan)
    small = kc.slim(model, plan)
    x = _inputs(model)
    assert relative_error(small(x), model(x)) < 1e-4
