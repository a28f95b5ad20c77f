"""`keras.layers.GroupQueryAttention` (issue 24): key/value heads and the
query heads within a key/value group as a grid of two groups, merged
exactly, and latency plans that keep every key/value group alike."""

import keras
import numpy as np
import pytest

import keras_csgd as kc
from mac_reference import reference_macs
from utils import (
    collapse,
    kept_query_heads,
    macs_latency_plan,
    relative_error,
)
from zoo import randomize

if not hasattr(keras.layers, "GroupQueryAttention"):
    pytest.skip("Keras without GroupQueryAttention", allow_module_level=True)

QUERY, KV = 8, 4  # query heads over key/value heads: 2 per group


def _model():
    """A pre-norm attention block with a residual, pooled to a head."""
    x = inp = keras.Input((10, 32))
    h = keras.layers.Dense(32, name="embed")(x)
    y = keras.layers.LayerNormalization(name="ln")(h)
    y = keras.layers.GroupQueryAttention(
        head_dim=8, num_query_heads=QUERY, num_key_value_heads=KV,
        name="gqa")(y, y, use_causal_mask=True)
    h = keras.layers.Add(name="add")([h, y])
    y = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return randomize(keras.Model(inp, keras.layers.Dense(3, name="head")(y)))


def _x(n=2):
    return np.random.default_rng(0).normal(size=(n, 10, 32)).astype(
        "float32")


def _heads(model):
    groups = {g.name: g for g in kc.channel_groups(model)}
    return groups["gqa/kv_heads"], groups["gqa/query_heads"]


def test_heads_are_a_grid_that_merges_exactly(tmp_path):
    model = _model()
    kv, positions = _heads(model)
    assert (kv.size, positions.size) == (KV, QUERY // KV)
    assert kv.exact and positions.exact
    # Query head k * 2 + j reads key/value head k (the layer's repeat).
    query = model.get_layer("gqa")._query_dense.kernel.path
    np.testing.assert_array_equal(kv.channel_map(query),
                                  np.repeat(np.arange(KV), 2))
    np.testing.assert_array_equal(positions.channel_map(query),
                                  np.tile([0, 1], KV))
    x = _x(1)
    assert kc.count_macs(model) == reference_macs(model, x)
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    small = kc.slim(model, plan, strict=True)
    layer = small.get_layer("gqa")
    assert layer.num_query_heads == QUERY // 2  # a half, not a quarter
    assert layer.num_query_heads % layer.num_key_value_heads == 0
    assert relative_error(small(_x()), model(_x())) < 1e-4
    assert kc.count_macs(small) == kc.macs_under(model, plan)
    assert kc.count_macs(small) == reference_macs(small, x)
    small.save(tmp_path / "slim.keras")
    loaded = keras.saving.load_model(tmp_path / "slim.keras")
    assert relative_error(loaded(_x()), small(_x())) == 0.0


@pytest.mark.parametrize("uniform", [False, True])
def test_latency_plan_keeps_key_value_groups_alike_and_slims_exactly(
        uniform):
    # A MACs 'runtime' (no timing): every key/value head keeps the same
    # number of query heads, and the collapsed plan slims exactly.
    model = _model()
    plan, report = macs_latency_plan(model, 0.6, clusters="kmeans",
                                     uniform=uniform)
    assert report.met and report.measured_ratio <= 0.6 * 1.05
    counts = kept_query_heads(model, plan, "gqa")
    assert len(set(counts.values())) == 1
    assert sum(counts.values()) < QUERY  # the heads were narrowed
    collapse(model, plan)
    small = kc.slim(model, plan, strict=True)
    layer = small.get_layer("gqa")
    assert (layer.num_query_heads, layer.num_key_value_heads) == (
        sum(counts.values()), len(counts))
    assert relative_error(small(_x()), model(_x())) < 1e-4
    if uniform:  # one keep: the widths `make_plan` gives for it
        sizes = {g.name: g.size for g in kc.channel_groups(model)}
        assert plan.widths() in [
            {n: w for n, w in kc.make_plan(model, keep=k / 32)
             .widths().items() if w < sizes[n]} for k in range(1, 33)]
