"""keras_hub decoder LLMs (issue 24): grouped-query heads, gated MLPs, and
backbones that keep their class, and `generate`, after `slim`."""

import warnings

import keras
import numpy as np
import pytest

import keras_csgd as kc
from hub_zoo import FAMILIES, TOKENS, VOCABULARY, inputs
from utils import collapse, relative_error

keras_hub = pytest.importorskip("keras_hub")

# Families whose backbone takes `head_dim`: a uniform plan that prunes
# heads keeps the class. The others derive it (`hidden_dim //
# num_query_heads`), as their CausalLMs do: only their MLP keeps it.
HEAD_DIM = ["Gemma", "Gemma3", "Mistral", "Qwen3"]
DERIVED = ["GPT2", "Llama", "Phi3", "Qwen2"]
CAUSAL_LM = {"Gemma": "GemmaCausalLM", "Gemma3": "Gemma3CausalLM",
             "Mistral": "MistralCausalLM", "Qwen3": "Qwen3CausalLM",
             "Llama": "LlamaCausalLM", "Phi3": "Phi3CausalLM",
             "Qwen2": "QwenCausalLM", "GPT2": "GPT2CausalLM"}


def _groups(model):
    return {g.name.split("/")[-1]: g for g in kc.channel_groups(model)
            if g.prunable}


@pytest.mark.parametrize("name", HEAD_DIM + DERIVED[1:])
def test_heads_are_grouped_query_consistent(name):
    model = FAMILIES[name].build()  # 4 query heads, 2 key/value heads
    groups = _groups(model)
    assert sorted(groups) == ["kv_heads", "mlp", "query_heads"]
    kv, positions = groups["kv_heads"], groups["query_heads"]
    assert (kv.size, positions.size) == (2, 2)
    # Query head k * 2 + j belongs to key/value head k, position j.
    (query,) = [p for _, p, _ in positions.members
                if p.endswith("query/kernel")]
    np.testing.assert_array_equal(kv.channel_map(query), [0, 0, 1, 1])
    np.testing.assert_array_equal(positions.channel_map(query), [0, 1, 0, 1])


def _lm(name, backbone):
    lm = getattr(keras_hub.models, CAUSAL_LM[name])(
        backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    return lm


def _generated(lm, prompt=4):
    x = inputs(lm.backbone, "text", n=2)
    x["padding_mask"][:, prompt:] = 0
    x["token_ids"][:, prompt:] = 0
    if isinstance(lm, keras_hub.models.Gemma3CausalLM):
        # keras_hub 0.32's `generate` concatenates Gemma3's `images: None`
        # without a preprocessor; its step is what it calls.
        return keras.ops.convert_to_numpy(
            lm.generate_step(x, stop_token_ids=None)["token_ids"])
    return lm.generate(x, stop_token_ids=None)["token_ids"]


def _logits(lm, x):
    return keras.ops.convert_to_numpy(lm(x))


def _collapsed_slim(model, plan):
    collapse(model, plan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = kc.slim(model, plan, strict=True)
    return small, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", HEAD_DIM)
def test_uniform_plan_keeps_the_class_and_generates_the_same(name):
    model = FAMILIES[name].build()
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    small, _ = _collapsed_slim(model, plan)
    assert type(small) is type(model)
    assert (small.num_query_heads, small.num_key_value_heads) == (1, 1)
    x = inputs(model, "text")
    lm, slim_lm = _lm(name, model), _lm(name, small)
    assert relative_error(_logits(slim_lm, x), _logits(lm, x)) < 1e-4
    np.testing.assert_array_equal(_generated(slim_lm), _generated(lm))
    macs = kc.count_macs(small, input_shape=(TOKENS,))
    assert macs == kc.macs_under(model, plan, input_shape=(TOKENS,))
    assert macs < 0.6 * kc.count_macs(model, input_shape=(TOKENS,))


@pytest.mark.parametrize("name", DERIVED)
def test_derived_head_size_keeps_the_class_for_the_mlp_only(name):
    model = FAMILIES[name].build()
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    mlp = {n: c for n, c in plan.clusters.items() if "heads" not in n}
    small, _ = _collapsed_slim(model, kc.PruningPlan(mlp, groups=plan.groups))
    assert type(small) is type(model)
    assert small.intermediate_dim == model.intermediate_dim // 2
    lm, slim_lm = _lm(name, model), _lm(name, small)
    np.testing.assert_array_equal(_generated(slim_lm), _generated(lm))
    # With heads pruned, the class would derive another head size.
    heads, messages = _collapsed_slim(model, plan)
    assert not isinstance(heads, type(model))
    assert any("derives the head size" in m for m in messages)
    x = inputs(model, "text")
    assert relative_error(heads(x), model(x)) < 1e-4


def test_layers_of_different_widths_give_a_functional_model(tmp_path):
    model = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=16, intermediate_dim=32)
    groups = {g.name: g for g in kc.channel_groups(model)}
    first = "transformer_layer_0/"
    plan = kc.PruningPlan({
        first + "kv_heads": [[0, 1]],
        first + "mlp": [[i, i + 1] for i in range(0, 32, 2)],
    }, groups=list(groups.values()))
    small, messages = _collapsed_slim(model, plan)
    assert not isinstance(small, keras_hub.models.Backbone)
    assert any("different widths" in m for m in messages)
    x = inputs(model, "text")
    assert relative_error(small(x), model(x)) < 1e-4
    small.save(tmp_path / "slim.keras")
    loaded = keras.saving.load_model(tmp_path / "slim.keras")
    assert relative_error(loaded(x), small(x)) == 0.0
    assert loaded.get_layer("transformer_layer_0").num_query_heads == 2


def test_slim_backbone_saves_to_preset_and_scores(tmp_path):
    model = FAMILIES["Qwen3"].build()
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    small, _ = _collapsed_slim(model, plan)
    small.save_to_preset(str(tmp_path))
    loaded = keras_hub.models.Backbone.from_preset(str(tmp_path))
    assert type(loaded) is type(model)
    x = inputs(model, "text")
    assert relative_error(loaded(x), small(x)) == 0.0
    lm, slim_lm = _lm("Qwen3", model), _lm("Qwen3", loaded)
    expected = lm.score(x["token_ids"], x["padding_mask"])
    actual = slim_lm.score(x["token_ids"], x["padding_mask"])
    assert relative_error(actual, expected) < 1e-4


def test_activation_importance_plans_a_slim_llm_that_generates():
    model = FAMILIES["Qwen3"].build()
    batches = [inputs(model, "text", n=4, seed=s) for s in range(2)]
    scores = kc.methods.activation_importance(model, batches)
    sizes = {name.split("/")[-1]: len(s) for name, s in scores.items()}
    assert sizes == {"kv_heads": 2, "query_heads": 2, "mlp": 32}
    plan = kc.plan_from_scores(model, scores, keep=0.5)
    small = kc.slim(model, plan)
    assert type(small) is type(model)
    assert small.intermediate_dim == 16
    assert _generated(_lm("Qwen3", small)).shape == (2, TOKENS)


@pytest.mark.parametrize("kv, positions, expected", [
    ([[0, 1]], None, [0, 1, 0, 1]),
    ([[0, 1]], [[0], [1]], [0, 1, 0, 1]),
    ([[0], [1]], [[0, 1]], [0, 0, 1, 1]),
    ([[0, 1]], [[0, 1]], [0, 0, 0, 0]),
])
def test_csgd_pulls_query_heads_by_both_their_clusters(kv, positions,
                                                        expected):
    # Query head k * 2 + j joins the heads of its key/value cluster and
    # its position cluster, whichever groups the plan merges.
    groups = kc.channel_groups(FAMILIES["Llama"].build())
    layer = "transformer_layer_0/"
    clusters = {layer + "kv_heads": kv}
    if positions is not None:
        clusters[layer + "query_heads"] = positions
    plan = kc.PruningPlan(clusters, groups=groups)
    segments = plan.variable_segments()
    axis, ids, _ = segments[layer + "self_attention/query/kernel"]
    assert axis == 1
    np.testing.assert_array_equal(ids, expected)
