"""`kc.methods.activation_importance` against NumPy on tiny models."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc

HEADS, KEY_DIM, UNITS = 4, 3, 10


@pytest.fixture(scope="module")
def transformer():
    """A pre-LN block: attention (heads), an MLP (units), a pooled head."""
    x = inp = keras.Input((6, 8))
    h = L.LayerNormalization(name="ln1")(x)
    h = L.MultiHeadAttention(HEADS, KEY_DIM, name="mha")(
        h, h, use_causal_mask=True)
    x = L.Add()([x, h])
    h = L.LayerNormalization(name="ln2")(x)
    h = L.Dense(UNITS, activation="relu", name="up")(h)
    x = L.Add()([x, L.Dense(8, name="down")(h)])
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(3, name="out")(x))


def _inputs(n=10, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 6, 8)).astype(
        "float32")


def _probe(model, name, x):
    return keras.Model(model.inputs, model.get_layer(name).output).predict(
        x, verbose=0).astype(np.float64)


def _reference_heads(model, x):
    """NumPy: mean over examples and tokens of each head's output norm."""
    h = _probe(model, "ln1", x)
    mha = model.get_layer("mha")

    def project(dense):
        w = dense.kernel.numpy().astype(np.float64)
        return np.einsum("btd,dnh->btnh", h, w) + dense.bias.numpy()

    q = project(mha.query_dense) / np.sqrt(KEY_DIM)
    k, v = project(mha.key_dense), project(mha.value_dense)
    logits = np.einsum("bqnh,bknh->bnqk", q, k)
    t = h.shape[1]
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bknh->bqnh", weights, v)
    return np.linalg.norm(out, axis=-1).mean(axis=(0, 1))


def test_heads_and_units_match_numpy(transformer):
    x = _inputs()
    scores = kc.methods.activation_importance(transformer, x, batch_size=4)
    prunable = {g.name for g in kc.channel_groups(transformer)
                if g.prunable}
    assert set(scores) == prunable
    np.testing.assert_allclose(scores["mha/heads"],
                               _reference_heads(transformer, x), rtol=1e-5)
    units = np.abs(_probe(transformer, "up", x)).mean(axis=(0, 1))
    np.testing.assert_allclose(scores["up"], units, rtol=1e-5)


def test_max_batches_reads_only_the_first_batches(transformer):
    x = _inputs()
    scores = kc.methods.activation_importance(
        transformer, x, batch_size=4, max_batches=1)
    units = np.abs(_probe(transformer, "up", x[:4])).mean(axis=(0, 1))
    np.testing.assert_allclose(scores["up"], units, rtol=1e-5)


def test_layers_are_restored(transformer):
    kc.methods.activation_importance(transformer, _inputs(2))
    for layer in transformer._flatten_layers():
        assert "call" not in layer.__dict__
    with pytest.raises(ValueError, match="no batch"):
        kc.methods.activation_importance(transformer, _inputs(0))
    for layer in transformer._flatten_layers():
        assert "call" not in layer.__dict__


def test_plan_keeps_the_most_active_heads(transformer):
    x = _inputs()
    scores = kc.methods.activation_importance(transformer, x)
    plan = kc.plan_from_scores(transformer, scores, keep=0.5)
    best = np.sort(np.argsort(-_reference_heads(transformer, x))[:2])
    assert plan.clusters["mha/heads"] == [[int(i)] for i in best]
    small = kc.slim(transformer, plan)
    assert small.get_layer("mha").num_heads == 2


def test_plan_for_latency_keeps_the_most_active_channels(transformer):
    scores = kc.methods.activation_importance(transformer, _inputs())
    plan = kc.plan_for_latency(
        transformer, 0.6, scores=scores, verbose=0,
        measure=lambda m: 1.0 + kc.count_macs(m) / 1e3)
    assert any(len(c) < plan.groups[n].size
               for n, c in plan.clusters.items())
    for name, clusters in plan.clusters.items():
        kept = [c[0] for c in clusters]
        assert kept == sorted(np.argsort(-scores[name])[:len(kept)])


def test_convolutions_read_behind_flatten():
    """A conv group read by a Dense through Flatten: mean |relu output|."""
    x = inp = keras.Input((5, 5, 2))
    x = L.Conv2D(4, 3, padding="same", name="conv")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Conv2D(3, 1, name="mix")(x)
    x = L.Flatten()(x)
    model = keras.Model(inp, L.Dense(2, name="out")(x))
    model.get_layer("bn").beta.assign([0.5, -0.2, 0.1, 0.3])
    data = np.random.default_rng(1).normal(size=(7, 5, 5, 2)).astype(
        "float32")
    scores = kc.methods.activation_importance(model, data, batch_size=3)
    relu = np.abs(_probe(model, "relu", data)).mean(axis=(0, 1, 2))
    mix = np.abs(_probe(model, "mix", data)).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(scores["conv"], relu, rtol=1e-5)
    np.testing.assert_allclose(scores["mix"], mix, rtol=1e-5)


def test_bad_max_batches(transformer):
    with pytest.raises(ValueError, match="max_batches"):
        kc.methods.activation_importance(transformer, _inputs(), max_batches=0)


def test_hidden_width_is_the_mean_normalized_output():
    """The residual stream of an embedding model: its readers (`up`,
    `logits`) read LayerNormalization outputs; the score averages them."""
    tokens = keras.Input((5,), dtype="int32")
    x = L.Embedding(11, 6, name="embedding")(tokens)
    h = L.LayerNormalization(name="ln1")(x)
    h = L.Dense(7, activation="gelu", name="up")(h)
    x = L.Add()([x, L.Dense(6, name="down")(h)])
    x = L.LayerNormalization(name="ln2")(x)
    model = keras.Model(tokens, L.Dense(11, name="logits")(x))
    groups = {g.name: g for g in kc.channel_groups(model)}
    if not groups["embedding"].prunable:
        pytest.skip("the hidden width is frozen by LayerNormalization")
    for name in ("ln1", "ln2"):
        layer = model.get_layer(name)
        layer.gamma.assign(np.linspace(0.5, 2.0, 6))
        layer.beta.assign(np.linspace(-1.0, 1.0, 6))
    data = np.random.default_rng(2).integers(0, 11, (9, 5)).astype("int32")
    scores = kc.methods.activation_importance(model, data, batch_size=4)
    expected = np.mean(
        [np.abs(_probe(model, n, data)).mean(axis=(0, 1))
         for n in ("ln1", "ln2")], axis=0)
    np.testing.assert_allclose(scores["embedding"], expected, rtol=1e-5)
    units = np.abs(_probe(model, "up", data)).mean(axis=(0, 1))
    np.testing.assert_allclose(scores["up"], units, rtol=1e-5)
