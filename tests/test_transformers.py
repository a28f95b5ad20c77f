"""Transformers: attention heads and MLP widths as groups, keras_hub models.

Every model is checked against itself: the identity plan is exact, and the
collapse test (each cluster's members set equal by hand, then `slim`)
matches the unpruned model's outputs.
"""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc
from keras_csgd.runtimes import litert
from utils import collapse, relative_error
from zoo import randomize, vit

keras_hub = pytest.importorskip("keras_hub")


def _hub_vit():
    return keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=4,
        hidden_dim=32, mlp_dim=48,
    )


def _hub_bert():
    return keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=2, num_heads=4, hidden_dim=32,
        intermediate_dim=48, max_sequence_length=16,
    )


def _images(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 16, 16, 3)).astype(
        "float32")


def _tokens(n=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, length), "int32")
    mask[:, length - 3:] = 0
    return {
        "token_ids": rng.integers(0, 50, (n, length)).astype("int32"),
        "segment_ids": rng.integers(0, 2, (n, length)).astype("int32"),
        "padding_mask": mask,
    }


MODELS = {
    "functional_vit": (vit, _images),
    "hub_vit": (_hub_vit, _images),
    "hub_bert": (_hub_bert, _tokens),
}


def _error(a, b):
    errors = keras.tree.flatten(keras.tree.map_structure(relative_error, a, b))
    return max(errors)


def _identity_plan(model):
    groups = kc.channel_groups(model)
    clusters = {g.name: [[i] for i in range(g.size)]
                for g in groups if g.prunable}
    return kc.PruningPlan(clusters, groups=groups)


def _kinds(model):
    """Prunable group names ending in heads, and the others (the residual
    stream, 32 wide, apart: `test_hidden_width.py`)."""
    names = [g.name for g in kc.channel_groups(model)
             if g.prunable and g.size != 32]
    heads = [n for n in names if n.endswith("/heads")]
    return heads, [n for n in names if n not in heads]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_heads_and_mlp_groups_are_prunable(name):
    model = MODELS[name][0]()
    heads, mlps = _kinds(model)
    assert len(heads) == 2 and len(mlps) == 2
    groups = {g.name: g for g in kc.channel_groups(model)}
    assert all(groups[h].size == 4 for h in heads)
    assert all(groups[m].size == 48 for m in mlps)
    # The query, key and value kernels produce a heads group.
    assert len(groups[heads[0]].producers) == 3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_identity_plan_is_exact(name):
    build, inputs = MODELS[name]
    model = randomize(build())
    x = inputs()
    small = kc.slim(model, _identity_plan(model))
    assert _error(small(x), model(x)) == 0.0


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", ["even", "kmeans"])
def test_collapsed_transformer_slims_exactly(name, method):
    build, inputs = MODELS[name]
    model = randomize(build())
    plan = kc.make_plan(model, keep=0.6, method=method)
    heads, mlps = _kinds(model)
    assert {*heads, *mlps} <= set(plan.clusters)
    collapse(model, plan)
    x = inputs()
    small = kc.slim(model, plan)
    assert _error(small(x), model(x)) < 1e-4
    assert small.count_params() < model.count_params()
    if name != "hub_bert":  # BERT's sequence length is dynamic: no MACs.
        assert kc.count_macs(small) < kc.count_macs(model)
        assert kc.count_macs(small) == kc.macs_under(model, plan)


def test_slim_heads_keep_their_size():
    model = randomize(vit())
    plan = kc.methods.magnitude_plan(model, keep=0.5)
    small = kc.slim(model, plan)
    mha = small.get_layer("t0_mha")
    assert mha.num_heads == 2 and mha.key_dim == 8
    # The residual stream is pruned too (32 to 16).
    assert mha.query_dense.kernel.shape == (16, 2, 8)
    assert mha.output_dense.kernel.shape == (2, 8, 16)
    assert small.get_layer("t0_fc1").units == 24


def test_attention_macs_match_hand_count():
    inp = keras.Input((10, 12))
    y = L.MultiHeadAttention(3, 4, value_dim=5, name="mha")(inp, inp)
    model = keras.Model(inp, L.Dense(2, name="out")(y))
    t, d, n = 10, 12, 3
    projections = t * d * n * 4 * 2 + t * d * n * 5
    attention = t * t * n * (4 + 5)
    output = t * n * 5 * 12
    assert kc.count_macs(model) == projections + attention + output + (
        t * 12 * 2)


def _merge_heads_model():
    """MultiHeadAttention called with keywords, its output group free."""
    q_in, v_in = keras.Input((6, 8)), keras.Input((5, 10))
    q = L.Dense(8, name="q_in")(q_in)
    v = L.Dense(10, name="v_in")(v_in)
    k = L.Dense(7, name="k_in")(v_in)
    y = L.MultiHeadAttention(4, 3, output_shape=9, name="mha")(
        query=q, value=v, key=k)
    y = L.Dense(6, activation="relu", name="after")(y)
    return keras.Model([q_in, v_in], L.Dense(2, name="out")(y))


def test_keyword_call_consumes_each_input_and_output_is_a_group():
    model = randomize(_merge_heads_model())
    groups = {g.name: g for g in kc.channel_groups(model)}
    consumers = {n: {(c[0], c[1]) for c in groups[n].consumers}
                 for n in ("q_in", "v_in", "k_in")}
    assert consumers == {
        "q_in": {("mha", "mha/query/kernel")},
        "v_in": {("mha", "mha/value/kernel")},
        "k_in": {("mha", "mha/key/kernel")},
    }
    assert groups["mha"].prunable and groups["mha"].size == 9
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    assert {"mha", "mha/heads", "q_in", "v_in", "k_in"} <= set(plan.clusters)
    collapse(model, plan)
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(3, 6, 8)).astype("float32"),
         rng.normal(size=(3, 5, 10)).astype("float32")]
    small = kc.slim(model, plan)
    assert relative_error(small(x), model(x)) < 1e-4
    assert small.get_layer("mha").output_dense.kernel.shape[-1] == 5


def _einsum_mlp(equation="abc,cd->abd", bias_axes="d", shape=(6, 16)):
    x = inp = keras.Input((6, 8))
    x = L.EinsumDense(equation, output_shape=shape,
                      bias_axes=bias_axes, activation="gelu", name="up")(x)
    x = L.EinsumDense("...b,bc->...c", output_shape=8, name="down")(x)
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(2, name="out")(x))


def test_einsum_dense_mlp_slims_exactly():
    model = randomize(_einsum_mlp())
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    assert set(plan.clusters) == {"up", "down"}
    collapse(model, plan)
    x = np.random.default_rng(0).normal(size=(3, 6, 8)).astype("float32")
    small = kc.slim(model, plan)
    assert relative_error(small(x), model(x)) < 1e-4
    assert small.get_layer("up").kernel.shape == (8, 8)
    assert kc.count_macs(small) < kc.count_macs(model)


def test_other_einsum_equations_map_their_indices():
    # `d` is new channels on axis 1, which the pooling that follows reduces.
    model = _einsum_mlp("abc,cd->adb", bias_axes=None, shape=(16, 6))
    groups = {g.name: g for g in kc.channel_groups(model)}
    assert ("up", "up/kernel", 1) in groups["up/axis1"].producers
    assert "removes an axis of channels" in groups["up/axis1"].reason


def test_plan_makers_work_on_heads_and_mlp_groups():
    model = randomize(vit())
    heads, mlps = _kinds(model)
    magnitude = kc.methods.magnitude_plan(model, keep=0.5, norm="l2")
    # Head norm: the query, key and value slices of each head.
    q = model.get_layer("t0_mha").query_dense.kernel.numpy()
    k = model.get_layer("t0_mha").key_dense.kernel.numpy()
    v = model.get_layer("t0_mha").value_dense.kernel.numpy()
    norms = np.sqrt(sum((w ** 2).sum(axis=(0, 2)) for w in (q, k, v)))
    kept = sorted(c[0] for c in magnitude.clusters["t0_mha/heads"])
    assert kept == sorted(np.argsort(-norms)[:2])
    scores = {name: np.arange(g, dtype=float)
              for name, g in ((h, 4) for h in heads)}
    scores.update({m: np.arange(48, dtype=float) for m in mlps})
    by_scores = kc.plan_from_scores(model, scores, keep=0.5)
    assert by_scores.clusters["t1_mha/heads"] == [[2], [3]]
    x = _images(32)
    y = np.random.default_rng(0).integers(0, 5, 32)
    model.compile(loss="sparse_categorical_crossentropy")
    importance = kc.methods.ensemble_importance(
        model, (x, y), samples=24, verbose=0)
    assert set(importance) == {*heads, *mlps, "patch"}  # patch: the stream
    assert importance["t0_mha/heads"].shape == (4,)
    for plan in (magnitude, by_scores):
        small = kc.slim(model, plan)
        assert small.get_layer("t0_mha").num_heads == 2


def test_csgd_segments_and_spread_cover_heads():
    model = randomize(vit())
    plan = kc.make_plan(model, keep=0.5, method="even")
    segments = plan.variable_segments()
    axis, seg, n = segments["t0_mha/query/bias"]
    assert axis == 0 and n == 2 and len(seg) == 4
    axis, seg, n = segments["t0_mha/key/kernel"]
    assert axis == 1 and n == 2
    assert kc.cluster_spread(model, plan)["groups"]["t0_mha/heads"] > 0
    collapse(model, plan)
    assert kc.cluster_spread(model, plan)["overall"] == 0.0


def test_csgd_training_collapses_heads_then_slims_exactly():
    model = randomize(vit(depth=1))
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    assert "patch" in plan.clusters  # the stream too, through weighed norms
    model.compile(
        optimizer=kc.CSGD(plan, learning_rate=0.05, centripetal_strength=1.0),
        loss="sparse_categorical_crossentropy", jit_compile=False,
    )
    x = _images(64)
    y = np.random.default_rng(0).integers(0, 5, 64)
    before = kc.cluster_spread(model, plan)["overall"]
    model.fit(x, y, batch_size=16, epochs=40, verbose=0)
    assert kc.cluster_spread(model, plan)["overall"] < 1e-3 * before
    small = kc.slim(model, plan)
    assert relative_error(small(x), model(x)) < 1e-4


@pytest.mark.parametrize("name", ["hub_vit", "hub_bert"])
def test_slim_hub_model_saves_and_loads(name, tmp_path):
    build, inputs = MODELS[name]
    model = randomize(build())
    small = kc.slim(model, kc.methods.magnitude_plan(model, keep=0.5))
    path = tmp_path / "slim.keras"
    small.save(path)
    loaded = keras.saving.load_model(path)
    x = inputs()
    assert _error(loaded(x), small(x)) == 0.0


def _slim_vit():
    model = randomize(vit())
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    return kc.slim(model, plan)


def test_keras_int8_quantization_of_a_slim_transformer():
    small = _slim_vit()
    x = _images(16)
    expected = small(x).numpy()
    small.quantize("int8")
    assert small.get_layer("t0_fc1").kernel.dtype == "int8"
    assert small.get_layer("t0_mha").query_dense.kernel.dtype == "int8"
    # int8 weights, per-channel scales: within 5% of the float outputs.
    assert relative_error(small(x).numpy(), expected) < 0.05


@pytest.mark.parametrize("quantize", ["dynamic", "int8"])
def test_litert_export_of_a_slim_transformer(quantize, tmp_path):
    small = _slim_vit()
    x = _images(64)
    result = kc.export_tflite(small, tmp_path / "vit.tflite",
                              quantize=quantize, representative_data=x)
    expected = small(x[:16]).numpy()
    actual = litert.run_tflite(result.path, x[:16])
    assert relative_error(actual, expected) <= litert.TOLERANCES[quantize]
