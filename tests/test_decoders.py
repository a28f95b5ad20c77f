"""keras_hub decoder LLMs (issue 24): grouped-query heads, gated MLPs, and
backbones that keep their class, and `generate`, after `slim`."""

import math
import warnings

import keras
import numpy as np
import pytest

import keras_csgd as kc
from hub_zoo import FAMILIES, TOKENS, VOCABULARY, inputs, outputs
from utils import (
    collapse,
    kept_query_heads,
    macs_latency_plan,
    relative_error,
)
from zoo import randomize

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
    assert sorted(groups) == ["kv_heads", "mlp", "query_heads",
                              "token_embedding"]
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


def _greedy(backbone, prompt=4, scale=1.0):
    """Greedy tokens computed without `generate` (or a cache): the whole
    sequence again for every new token. `scale`: what the backbone's
    logits are multiplied by (argmax does not see it)."""
    x = inputs(backbone, "text", n=2)
    tokens = x["token_ids"].copy()
    tokens[:, prompt:] = 0
    for t in range(prompt, tokens.shape[1]):
        feed = {**x, "token_ids": tokens}  # causal: later tokens unseen
        logits = backbone.token_embedding(backbone(feed), reverse=True)
        tokens[:, t] = np.argmax(keras.ops.convert_to_numpy(logits)[:, t - 1],
                                 axis=-1)
    return tokens


def _assert_same_lm(name, model, small):
    """The CausalLMs of `model` and of its slim backbone `small` compute the
    same logits (1e-4) and greedy tokens."""
    x = inputs(model, "text")
    lm, slim_lm = _lm(name, model), _lm(name, small)
    assert relative_error(_logits(slim_lm, x), _logits(lm, x)) < 1e-4
    np.testing.assert_array_equal(_generated(slim_lm), _generated(lm))


def _collapsed_slim(model, plan):
    collapse(model, plan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = kc.slim(model, plan, strict=True)
    return small, [str(w.message) for w in caught]


def _heads(backbone):
    return getattr(backbone, "num_query_heads", None) or backbone.num_heads


@pytest.mark.parametrize("name", HEAD_DIM + DERIVED)
def test_uniform_plan_keeps_the_class_and_generates_the_same(name):
    # Half of the query heads (whole key/value groups), MLP units and
    # hidden channels, merged: the class holds them (the hidden width
    # follows the heads where the class derives the head size), through
    # tied output embeddings too (Gemma, Gemma3, Qwen2, Qwen3: the final
    # norm takes the cluster sizes). GPT-2's class cannot weigh merged
    # channels in its LayerNorms: `make_plan` leaves its stream whole, and
    # its heads with it.
    model = FAMILIES[name].build()
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    small, _ = _collapsed_slim(model, plan)
    assert type(small) is type(model)
    share = 1 if name == "GPT2" else 0.5
    assert _heads(small) == share * _heads(model)
    assert small.hidden_dim == share * model.hidden_dim
    if name != "GPT2":
        assert small.num_key_value_heads == model.num_key_value_heads // 2
    if name in DERIVED:  # the head size the class derives is kept
        assert (small.hidden_dim // _heads(small)
                == model.hidden_dim // _heads(model))
    _assert_same_lm(name, model, small)
    macs = kc.count_macs(small, input_shape=(TOKENS,))
    assert macs == kc.macs_under(model, plan, input_shape=(TOKENS,))
    assert macs < 0.8 * kc.count_macs(model, input_shape=(TOKENS,))


@pytest.mark.parametrize("kv, heads", [(1, (2, 1)), (2, (2, 1)),
                                       (4, (2, 2))])
def test_uniform_keep_halves_the_query_heads(kv, heads):
    # Of 4 query heads over `kv` key/value heads: query heads within the
    # one key/value group, whole key/value groups, or heads alone go.
    model = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCABULARY, num_layers=1, num_query_heads=4,
        num_key_value_heads=kv, hidden_dim=16, intermediate_dim=32)
    small = kc.slim(model, kc.methods.magnitude_plan(model, keep=0.5))
    assert (small.num_query_heads, small.num_key_value_heads) == heads
    assert small.hidden_dim == 8  # the heads' share, the head size kept


@pytest.mark.parametrize("name", ["GPT2", "Qwen2"])
def test_derived_heads_follow_the_hidden_width(name):
    # GPT-2's hidden width, which `make_plan` leaves (its class cannot
    # weigh merged channels in LayerNorms), would not follow pruned heads:
    # they stay whole, the class with them. Qwen2's (tied too) merges, and
    # the heads follow it.
    model = FAMILIES[name].build()
    groups = _groups(model)
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    heads = {n: w for n, w in plan.widths().items() if "heads" in n}
    share = 1 if name == "GPT2" else 0.5
    assert math.prod(heads.values()) == share * math.prod(
        g.size for n, g in groups.items() if "heads" in n)
    assert ("token_embedding" in plan.clusters) == (name == "Qwen2")
    # Heads pruned alone: the class would derive another head size.
    keep = {g.name: 0.5 for n, g in groups.items() if "heads" in n}
    functional, messages = _collapsed_slim(model, kc.make_plan(model, keep))
    assert not isinstance(functional, type(model))
    assert any("derives the head size" in m for m in messages)
    x = inputs(model, "text")
    assert relative_error(outputs(functional, x, model),
                          outputs(model, x)) < 1e-4


def test_gpt2_merged_hidden_width_is_exact_as_a_functional_model():
    # Merged by hand (clusters of different sizes): the final norm takes
    # the sizes, so the slim model is exact; GPT-2's class, whose
    # LayerNorms cannot weigh them, is not kept.
    model = FAMILIES["GPT2"].build()
    keep = {n: 0.5 for n, g in kc.make_plan(model, keep=0.5).groups.items()}
    keep.update({g.name: 0.5 for g in kc.channel_groups(model)
                 if g.name == "token_embedding" or "heads" in g.name})
    plan = kc.make_plan(model, keep=keep, method="kmeans")
    assert len({len(c) for c in plan.clusters["token_embedding"]}) > 1
    small, messages = _collapsed_slim(model, plan)
    assert not isinstance(small, type(model))
    assert any("LayerNormalizations cannot weigh" in m for m in messages)
    x = inputs(model, "text")
    assert relative_error(outputs(small, x, model), outputs(model, x)) < 1e-4


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


@pytest.mark.parametrize("uniform", [None, False])
def test_latency_plan_is_grouped_query_consistent_and_exact(uniform):
    # A MACs 'runtime' (no timing). Every key/value head keeps the same
    # query heads; collapsed, the slim model computes the same. By default
    # a decoder backbone is planned with one `keep` for every group, so it
    # keeps its class and generates the same tokens; a width per group
    # (`uniform=False`) gives layers of different widths here.
    model = randomize(keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=8,
        num_key_value_heads=4, hidden_dim=32, intermediate_dim=64))
    plan, report = macs_latency_plan(model, 0.6, (TOKENS,),
                                     clusters="kmeans", uniform=uniform)
    assert report.met and report.measured_ratio <= 0.6 * 1.05
    assert report.macs is None  # a dynamic sequence length
    small, messages = _collapsed_slim(model, plan)
    x = inputs(model, "text")
    assert relative_error(outputs(small, x, model), outputs(model, x)) < 1e-4
    for k, block in enumerate(small.transformer_layers if uniform is None
                              else [small.get_layer(f"transformer_layer_{k}")
                                    for k in range(2)]):
        counts = kept_query_heads(model, plan, f"transformer_layer_{k}")
        assert len(set(counts.values())) == 1
        assert block.num_query_heads == sum(counts.values())
        assert block.num_key_value_heads == len(counts)
    if uniform is None:
        assert type(small) is type(model)
        assert small.hidden_dim // small.num_query_heads == 4
        assert small.num_query_heads < 8 and small.intermediate_dim < 64
        _assert_same_lm("Llama", model, small)
    else:
        assert any("different widths" in m for m in messages)


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
    assert sizes == {"kv_heads": 2, "query_heads": 2, "mlp": 32,
                     "token_embedding": 16}
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


FAMILY_NAMES = HEAD_DIM + DERIVED
GEMMA = ("Gemma", "Gemma3")  # `intermediate_dim` counts gate and up units


def _wide(name):
    """The family at sizes no two axes share (hidden 24, 4 query heads of
    6 over 2 key/value heads, 40 MLP units), random weights."""
    model = FAMILIES[name].build()
    config = model.get_config()
    config.update(hidden_dim=24,
                  intermediate_dim=80 if name in GEMMA else 40)
    config["num_heads" if name == "GPT2" else "num_query_heads"] = 4
    if "head_dim" in config:
        config["head_dim"] = 6
    return randomize(type(model).from_config(config))


def _half_plan(model, seed=0):
    """Half of every group's channels (chosen at random) but the key/value
    heads': the hidden width and the query heads keep one share, so
    the head size stays `hidden_dim // num_query_heads`."""
    groups = kc.channel_groups(model)
    rng = np.random.default_rng(seed)
    clusters = {}
    for g in groups:
        if g.prunable:
            keep = g.size if g.name.endswith("kv_heads") else g.size // 2
            kept = np.sort(rng.permutation(g.size)[:keep])
            clusters[g.name] = [[int(i)] for i in kept]
    return kc.PruningPlan(clusters, groups=groups)


def _reference(name, model, plan):
    """`model`'s class built at half the widths, every weight sliced by
    hand: on each axis the narrower class shortens, the kept channels of
    the group of that size (query head `k * 2 + j` of key/value head `k`
    and position `j`)."""
    kept = {}
    for group, clusters in plan.clusters.items():
        ids = [c[0] for c in clusters]
        if group.endswith("query_heads"):
            ids = [k * 2 + j for k in range(2) for j in ids]
        kept[4 if "heads" in group else plan.groups[group].size] = ids
    config = model.get_config()
    config.update(hidden_dim=12,
                  intermediate_dim=config["intermediate_dim"] // 2)
    config["num_heads" if name == "GPT2" else "num_query_heads"] = 2
    reference = type(model).from_config(config)
    source = {v.path: v.numpy() for v in model.weights}
    for v in reference.weights:
        w = source[v.path]
        for axis, (old, new) in enumerate(zip(w.shape, v.shape)):
            if old != new:
                w = np.take(w, kept[old], axis=axis)
        v.assign(w)
    return reference


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_hidden_width_is_a_group_that_merges(name):
    model = FAMILIES[name].build()
    groups = {g.name: g for g in kc.channel_groups(model)}
    stream = groups["token_embedding"]
    assert stream.prunable
    members = {path for _, path, _ in stream.members}
    norms = [model.layer_norm, *(
        layer for block in model.transformer_layers
        for layer in block._flatten_layers(include_self=False)
        if "norm" in layer.name and "query" not in layer.name
        and "key" not in layer.name)]
    assert len(norms) >= 3  # the final norm and two per block, at least
    assert {v.path for n in norms for v in n.weights} <= members
    assert model.token_embedding.embeddings.path in members
    assert any("query" in path for _, path, _ in stream.consumers)
    plan = kc.make_plan(model, keep=0.5)
    assert set(plan.clusters) == {n for n, g in groups.items()
                                  if g.prunable and g.exact} - (
        {"token_embedding"} if name == "GPT2" else set())
    kc.CSGD(plan)
    pruned = kc.methods.magnitude_plan(model, keep=0.5)
    assert pruned.widths()["token_embedding"] == 8
    pruned_model = kc.slim(model, pruned)
    assert type(pruned_model) is type(model)
    assert _heads(pruned_model) == _heads(model) // 2
    full = kc.count_macs(model, input_shape=(TOKENS,))
    assert kc.macs_under(model, pruned, input_shape=(TOKENS,)) <= 0.3 * full
    assert stream.exact
    if model.token_embedding.tie_weights:
        # The CausalLM's logits read the table itself, after the final
        # norm, which they alone read: it takes merged clusters' sizes.
        absorbing = kc.graph.analyze(model).absorbing
        assert list(absorbing) == [model.layer_norm.name]
        kc.CSGD(pruned)
    else:
        # The output projection's rows are summed, the norms weighed.
        assert (model.token_embedding.reverse_embeddings.path
                in {path for _, path, _ in stream.consumers})
        assert "token_embedding" in plan.clusters
    identity = kc.PruningPlan(
        {n: [[i] for i in range(g.size)] for n, g in groups.items()
         if g.prunable}, groups=list(groups.values()))
    small = kc.slim(model, identity)
    assert type(small) is type(model)
    x = inputs(model, "text")
    assert relative_error(small(x), model(x)) == 0.0


def _untied(name):
    """The family with an output projection of its own (Qwen2 and Qwen3
    tie it to the embedding by default), random weights."""
    model = FAMILIES[name].build()
    if model.token_embedding.tie_weights:
        model = type(model).from_config(
            {**model.get_config(), "tie_word_embeddings": False})
    return randomize(model)


def _pairs_plan(model):
    """Key/value heads whole; the query heads' positions, the hidden width
    and the MLP units merged in pairs, so the head size stays
    `hidden_dim // num_query_heads` (8 // 2)."""
    groups = kc.channel_groups(model)
    return kc.PruningPlan({
        g.name: [[i] for i in range(g.size)] if g.name.endswith("kv_heads")
        else [[i, i + g.size // 2] for i in range(g.size // 2)]
        for g in groups if g.prunable}, groups=groups)


@pytest.mark.parametrize("name", ["Llama", "Mistral", "Phi3", "Qwen2",
                                  "Qwen3"])
def test_merged_hidden_width_keeps_the_class_and_generates_the_same(
        name, tmp_path):
    model = _untied(name)
    plan = _pairs_plan(model)
    assert plan.widths()["token_embedding"] == 8
    collapse(model, plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the class, no functional model
        small = kc.slim(model, plan, strict=True)
    assert type(small) is type(model)
    assert (small.hidden_dim, small.num_query_heads) == (8, 2)
    _assert_same_lm(name, model, small)
    x = inputs(model, "text")
    small.save_to_preset(str(tmp_path))
    loaded = keras_hub.models.Backbone.from_preset(str(tmp_path))
    assert relative_error(loaded(x), small(x)) == 0.0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_hidden_width_plan_keeps_the_class_and_generates(name, tmp_path):
    model = _wide(name)
    plan = _half_plan(model)
    assert plan.widths()["token_embedding"] == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no functional model
        small = kc.slim(model, plan)
    assert type(small) is type(model)
    assert small.hidden_dim == 12 and small.intermediate_dim == (
        model.intermediate_dim // 2)
    reference = _reference(name, model, plan)
    # Gemma multiplies its embeddings by sqrt(hidden_dim): the slim model
    # keeps the full width's factor.
    scale = np.sqrt(2.0) if name in GEMMA else 1.0
    reference.token_embedding.embeddings.assign(
        scale * reference.token_embedding.embeddings)
    x = inputs(model, "text")
    assert relative_error(small(x), reference(x)) < 1e-4
    expected = reference.token_embedding(reference(x), reverse=True) / scale
    slim_lm = _lm(name, small)
    assert relative_error(_logits(slim_lm, x), expected) < 1e-4
    np.testing.assert_array_equal(_generated(slim_lm), _greedy(reference))
    small.save(tmp_path / "slim.keras")
    loaded = keras.saving.load_model(tmp_path / "slim.keras")
    assert type(loaded) is type(model)
    assert relative_error(loaded(x), small(x)) == 0.0


def test_query_scale_of_hidden_width_over_heads_freezes():
    # Gemma's attention may scale queries by (hidden_dim // heads) ** -0.5,
    # which pruning heads or the stream would change.
    model = FAMILIES["Gemma"].build()
    model.get_layer("decoder_block_0").attention.query_head_dim_normalize = (
        False)
    groups = kc.channel_groups(model)
    assert not any(g.prunable for g in groups)
    assert any("query scale" in g.reason for g in groups)


def test_csgd_merges_the_hidden_width_of_the_llm_it_trains():
    # C-SGD plans the exact stream of an untied LLM (with its query heads
    # and MLP units), trains the CausalLM until the clusters collapse, and
    # the slim backbone is its class, computing the trained logits.
    model = FAMILIES["Llama"].build()
    plan = _pairs_plan(model)
    lm = keras_hub.models.LlamaCausalLM(backbone=model, preprocessor=None)
    lm.compile(
        optimizer=kc.CSGD(plan, learning_rate=0.1, centripetal_strength=1.0,
                          vector_strength_scale=1.0, jit_compile=False),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False)
    x = inputs(model, "text", n=32)
    lm.fit(x, np.roll(x["token_ids"], -1, axis=1), epochs=60, batch_size=16,
           verbose=0)
    assert kc.cluster_spread(model, plan)["overall"] < 1e-4
    small = kc.slim(model, plan, strict=True)
    assert type(small) is type(model) and small.hidden_dim == 8
    _assert_same_lm("Llama", model, small)
