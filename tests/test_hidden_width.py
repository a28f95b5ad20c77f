"""The residual stream (hidden width) of transformers, through norms.

A group that passes a normalization over its channels (LayerNormalization,
RMS norms) is prunable but prune-only: the methods that recover by
training may remove its channels, C-SGD may not plan it, no plan may merge
it. The slim model is checked against an independent reference: the same
architecture built at the kept width, its weights sliced by hand (every
axis of the hidden width `D`, which no other axis of these models has), so
its norms take their statistics over the kept channels only.
"""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc
from keras_csgd.layers.cluster_norm import ClusterNormalization
from keras_csgd.models import resnet_cifar
from utils import collapse, relative_error
from zoo import randomize

D = 24  # the hidden width; no other axis of these models is 24
VOCAB = 30


def _encoder(dim=D):
    """A pre-norm ViT: patch Conv2D, attention, MLP, norm, pooled head."""
    x = inp = keras.Input((16, 16, 3))
    x = L.Conv2D(dim, 4, strides=4, name="patch")(x)
    x = L.Reshape((16, dim), name="tokens")(x)
    y = L.LayerNormalization(name="ln1")(x)
    y = L.MultiHeadAttention(2, 8, name="mha")(y, y)
    x = L.Add(name="add1")([x, y])
    y = L.LayerNormalization(name="ln2")(x)
    y = L.Dense(40, activation="gelu", name="fc1")(y)
    x = L.Add(name="add2")([x, L.Dense(dim, name="fc2")(y)])
    x = L.LayerNormalization(name="ln")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inp, L.Dense(5, name="head")(x))


def _language_model(dim=D, tied=True, final_norm=True):
    """A decoder LM: a ReversibleEmbedding (tied: its table is the output
    projection), RMS norms, causal attention; `final_norm=False`: the
    output projection reads the stream with no norm of its own (through a
    tied table, the stream is then prune-only)."""
    ids = keras.Input((10,), dtype="int32")
    embedding = L.ReversibleEmbedding(VOCAB, dim, tie_weights=tied,
                                      name="embedding")
    x = embedding(ids)
    y = L.RMSNormalization(name="norm1")(x)
    y = L.MultiHeadAttention(2, 8, name="mha")(y, y, use_causal_mask=True)
    x = L.Add(name="add1")([x, y])
    y = L.LayerNormalization(name="norm2")(x)
    y = L.Dense(40, activation="gelu", name="fc1")(y)
    x = L.Add(name="add2")([x, L.Dense(dim, name="fc2")(y)])
    if final_norm:
        x = L.RMSNormalization(name="norm")(x)
    return keras.Model(ids, embedding(x, reverse=True))


def _images(n=3):
    return np.random.default_rng(1).normal(size=(n, 16, 16, 3)).astype(
        "float32")


def _ids(n=3):
    return np.random.default_rng(1).integers(0, VOCAB, (n, 10)).astype(
        "int32")


MODELS = {"encoder": (_encoder, _images),
          "language_model": (_language_model, _ids)}


def _hidden(model):
    (group,) = [g for g in kc.channel_groups(model) if g.size == D]
    return group


def _reference(build, model, kept):
    """`build` at the kept width, every `D` axis of every weight sliced."""
    small = build(len(kept))
    for layer in model.layers:
        if not layer.weights:
            continue
        new = small.get_layer(layer.name)
        values = []
        for w in layer.get_weights():
            for axis, n in enumerate(w.shape):
                if n == D:
                    w = np.take(w, kept, axis=axis)
            values.append(w)
        new.set_weights(values)
    return small


def test_hidden_width_groups_say_whether_they_merge_exactly():
    encoder = _hidden(_encoder())
    assert encoder.prunable and encoder.exact  # Keras norms are weighed
    model = _language_model(final_norm=False)
    group = _hidden(model)  # the tied embedding makes it prune-only
    assert group.prunable and not group.exact
    assert "shares the embedding's table" in group.prune_only
    assert "prune-only" in repr(group)
    others = [g for g in kc.channel_groups(model)
              if g.prunable and g.name != group.name]
    assert others and all(g.exact for g in others)  # heads, MLP units
    plan = kc.methods.magnitude_plan(model, keep=0.5)
    again = kc.PruningPlan.from_json(plan.to_json())
    assert again.groups[group.name].prune_only == group.prune_only
    assert not again.groups[group.name].exact


def test_untied_output_projection_merges_exactly():
    # Its own projection's rows are summed per cluster, the norms weighed.
    model = randomize(_language_model(tied=False))
    group = _hidden(model)
    assert group.exact
    projection = model.get_layer("embedding").reverse_embeddings.path
    assert ("embedding", projection, 0) in group.consumers
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    assert plan.widths()[group.name] == D // 2
    collapse(model, plan)
    small = kc.slim(model, plan, strict=True)
    x = _ids()
    assert relative_error(small(x), model(x)) < 1e-4


@pytest.mark.parametrize("final", ["RMSNormalization",
                                   "LayerNormalization"])
def test_tied_output_projection_merges_exactly_through_its_norm(final):
    # The tied table keeps each cluster's column; the final norm, which
    # the projection alone reads, gives it the cluster's sum.
    model = _language_model()
    if final == "LayerNormalization":  # with a `beta`, multiplied too
        model = keras.Model(model.input, model.get_layer("embedding")(
            L.LayerNormalization(name="ln")(model.get_layer("add2").output),
            reverse=True))
    model = randomize(model)
    group = _hidden(model)
    assert group.exact
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    assert plan.widths()[group.name] == D // 2
    assert len({len(c) for c in plan.clusters[group.name]}) > 1
    collapse(model, plan)
    small = kc.slim(model, plan, strict=True)
    x = _ids()
    assert relative_error(small(x), model(x)) < 1e-4
    # Read by another layer too, the norm cannot take the cluster sizes.
    norm = model.get_layer("ln" if final == "LayerNormalization" else "norm")
    shared = keras.Model(model.input, [
        model.output, L.Dense(3, name="probe")(norm.output)])
    assert not _hidden(shared).exact
    assert "no normalization with a gain" in _hidden(shared).prune_only


def test_tied_output_projection_follows_the_embedding():
    model = _language_model(final_norm=False)
    group = _hidden(model)
    assert ("embedding", model.get_layer("embedding").embeddings.path, 1) in (
        group.members)
    assert "shares the embedding's table" in group.prune_only
    # The logits' MACs (10 positions x D x VOCAB) scale with the group.
    plan = kc.plan_from_scores(model, {group.name: np.arange(D)}, keep=0.5)
    assert kc.count_macs(model) - kc.macs_under(model, plan) >= (
        10 * VOCAB * D // 2)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruned_hidden_width_equals_reference(name):
    build, inputs = MODELS[name]
    model = randomize(build())
    group = _hidden(model)
    scores = np.random.default_rng(0).normal(size=D)
    plan = kc.plan_from_scores(model, {group.name: scores}, keep=0.5)
    kept = [c[0] for c in plan.clusters[group.name]]
    small = kc.slim(model, plan)
    x = inputs()
    expected = _reference(build, model, kept)(x)
    assert relative_error(small(x), expected) < 1e-5
    assert relative_error(small(x), model(x)) > 1e-3  # it did change


@pytest.mark.parametrize("name", sorted(MODELS))
def test_slim_macs_and_keras_round_trip(name, tmp_path):
    build, inputs = MODELS[name]
    model = randomize(build())
    plan = kc.methods.magnitude_plan(model, keep=0.5)
    assert _hidden(model).name in plan.clusters
    small = kc.slim(model, plan)
    assert kc.count_macs(small) == kc.macs_under(model, plan)
    assert kc.count_macs(small) < 0.4 * kc.count_macs(model)
    small.save(tmp_path / "slim.keras")
    loaded = keras.saving.load_model(tmp_path / "slim.keras")
    x = inputs()
    assert relative_error(loaded(x), small(x)) == 0.0


def test_exact_methods_leave_prune_only_groups_out():
    model = _language_model(final_norm=False)
    hidden = _hidden(model).name
    plan = kc.make_plan(model, keep=0.5)
    assert plan.clusters and hidden not in plan.clusters
    assert hidden in kc.methods.magnitude_plan(model, keep=0.5).clusters
    with pytest.raises(ValueError, match="may only be pruned, not merged"):
        kc.make_plan(model, keep={hidden: 0.5})
    with pytest.raises(ValueError, match="may only be pruned, not merged"):
        kc.PruningPlan({hidden: [[0, 1], *[[i] for i in range(2, D)]]},
                       groups=kc.channel_groups(model))
    pruned = kc.plan_from_scores(model, {hidden: np.arange(D)}, keep=0.5)
    with pytest.raises(ValueError, match="prune-only group"):
        kc.CSGD(pruned)
    with pytest.raises(ValueError, match="prune-only group"):
        kc.CSGD(pruned.to_json())


@pytest.mark.parametrize("rms", [False, True])
def test_cluster_normalization_equals_the_norm_of_repeated_channels(rms):
    counts = np.array([2, 1, 3, 1])
    x = np.random.default_rng(0).normal(size=(3, 5, 4)).astype("float32")
    gamma = np.random.default_rng(1).uniform(0.5, 1.5, 4).astype("float32")
    wide = np.repeat(x, counts, axis=-1)
    norm = L.RMSNormalization() if rms else L.LayerNormalization()
    norm.build(wide.shape)
    norm.set_weights([np.repeat(w, counts) for w in (
        [gamma] if rms else [gamma, -gamma])])
    first = np.cumsum(counts) - counts
    expected = keras.ops.convert_to_numpy(norm(wide))[..., first]
    layer = ClusterNormalization(
        counts, rms=rms, epsilon=norm.epsilon,
        scale_name="scale" if rms else "gamma")
    layer.build(x.shape)
    layer.set_weights([gamma] if rms else [gamma, -gamma])
    assert relative_error(layer(x), expected) < 1e-5
    again = kc.layers.ClusterNormalization.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="positive integers"):
        ClusterNormalization([1, 0])


@pytest.mark.parametrize("method", ["even", "kmeans"])
def test_collapsed_stream_slims_exactly_through_weighed_norms(
        method, tmp_path):
    model = randomize(_encoder())
    hidden = _hidden(model).name
    plan = kc.make_plan(model, keep=0.5, method=method)
    assert hidden in plan.clusters
    collapse(model, plan)
    small = kc.slim(model, plan, strict=True)
    x = _images()
    assert relative_error(small(x), model(x)) < 1e-4
    norms = [layer for layer in small.layers
             if isinstance(layer, ClusterNormalization)]
    assert len(norms) == 3
    assert all(sum(n.counts) == D for n in norms)
    assert kc.count_macs(small) == kc.macs_under(model, plan)
    small.save(tmp_path / "slim.keras")
    loaded = keras.saving.load_model(tmp_path / "slim.keras")
    assert relative_error(loaded(x), small(x)) == 0.0
    # Slimming the slim model again adds up its counts.
    groups = kc.channel_groups(small)
    stream = [g for g in groups if g.size == plan.widths()[hidden]]
    assert len(stream) == 1 and stream[0].exact
    thirds = [list(range(k, k + D // 6)) for k in range(0, D // 2, D // 6)]
    twice = kc.PruningPlan({stream[0].name: thirds}, groups=groups)
    collapse(small, twice)
    smaller = kc.slim(small, twice, strict=True)
    assert relative_error(smaller(x), small(x)) < 1e-4
    counts = [n.counts for n in smaller.layers
              if isinstance(n, ClusterNormalization)]
    assert len(counts) == 3 and all(
        len(c) == 3 and sum(c) == D for c in counts)


def test_convolutional_plans_do_not_change():
    model = resnet_cifar(8, input_shape=(16, 16, 3))
    groups = kc.channel_groups(model)
    assert all(g.exact for g in groups)
    plan = kc.make_plan(model, keep=0.5)
    assert set(plan.clusters) == {g.name for g in groups if g.prunable}
    kc.CSGD(plan)


def _hub_families():
    hub = pytest.importorskip("keras_hub").models
    text = dict(vocabulary_size=64, num_layers=2, num_heads=4, hidden_dim=32,
                intermediate_dim=64, max_sequence_length=12)
    return {
        "ViT": (lambda: hub.ViTBackbone(
            image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=4,
            hidden_dim=32, mlp_dim=64), "image"),
        "BERT": (lambda: hub.BertBackbone(**text), "text"),
        "DistilBERT": (lambda: hub.DistilBertBackbone(**text), "text"),
        "DeBERTaV3": (lambda: hub.DebertaV3Backbone(bucket_size=4, **text),
                      "text"),
        "RoBERTa": (lambda: hub.RobertaBackbone(**text), "text"),
        "ELECTRA": (lambda: hub.ElectraBackbone(
            embedding_dim=24, vocab_size=64,
            **{k: v for k, v in text.items() if k != "vocabulary_size"}),
                    "text"),
    }


def _task(name):
    """A keras_hub backbone with a classifier on its first token (a
    backbone's own output keeps its width: it is frozen)."""
    build, kind = _hub_families()[name]
    backbone = build()
    out = backbone.output
    out = out["sequence_output"] if isinstance(out, dict) else out
    head = L.Dense(3, name="task_head")(out[:, 0])
    return keras.Model(backbone.input, head), kind


def _macs(model, kind, plan=None):
    shape = (12,) if kind == "text" else None
    if plan is None:
        return kc.count_macs(model, input_shape=shape)
    return kc.macs_under(model, plan, input_shape=shape)


@pytest.mark.parametrize(
    "name", ["ViT", "BERT", "DistilBERT", "RoBERTa", "ELECTRA", "DeBERTaV3"])
def test_hub_encoders_prune_their_hidden_width(name):
    from hub_zoo import inputs

    model, kind = _task(name)
    x = inputs(model, kind)
    (hidden,) = [g for g in kc.channel_groups(model)
                 if g.prunable and g.size == 32]
    assert hidden.exact  # the rebuilt encoders weigh merged channels
    plan = kc.methods.magnitude_plan(model, keep=0.5)
    assert plan.widths()[hidden.name] == 16
    small = kc.slim(model, plan, inputs=x)  # 12 tokens at most
    assert small(x).shape == model(x).shape
    macs = _macs(small, kind)
    assert macs == _macs(model, kind, plan)
    assert macs <= 0.35 * _macs(model, kind)


@pytest.mark.parametrize("name", ["ViT", "BERT", "DeBERTaV3"])
def test_hub_encoders_keep_their_class_and_merge_exactly(name, tmp_path):
    from hub_zoo import inputs
    from keras_csgd.layers import hub_deberta
    from keras_csgd.layers.hub import (
        PrunedTransformerEncoder,
        PrunedViTEncoder,
    )

    model, kind = _task(name)
    randomize(model)
    x = inputs(model, kind)
    groups = kc.channel_groups(model)
    identity = kc.PruningPlan(
        {g.name: [[i] for i in range(g.size)] for g in groups if g.prunable},
        groups=groups)
    assert relative_error(kc.slim(model, identity)(x), model(x)) == 0.0
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    (hidden,) = [g.name for g in groups if g.prunable and g.size == 32]
    assert plan.widths()[hidden] == 16
    collapse(model, plan)
    small = kc.slim(model, plan, strict=True)
    assert relative_error(small(x), model(x)) < 1e-4
    pruned = {"ViT": (PrunedViTEncoder,), "BERT": (PrunedTransformerEncoder,),
              "DeBERTaV3": (hub_deberta.PrunedDisentangledAttentionEncoder,
                            hub_deberta.PrunedRelativeEmbedding)}[name]
    encoders = [layer for layer in small.layers if isinstance(layer, pruned)]
    assert {type(layer) for layer in encoders} == set(pruned)
    for layer in encoders:
        assert sum(layer.norm_counts) == 32 and len(layer.norm_counts) == 16
    if name == "ViT":
        assert encoders[0].hidden_dim == 16
    small.save(tmp_path / "slim.keras")
    loaded = keras.saving.load_model(tmp_path / "slim.keras")
    assert relative_error(loaded(x), small(x)) == 0.0


def test_tied_projection_across_a_nested_model_freezes():
    """keras_hub's causal LMs call the backbone's embedding in reverse
    from outside the backbone: `slim` would rebuild two tables."""
    ids = keras.Input((10,), dtype="int32")
    embedding = L.ReversibleEmbedding(VOCAB, D, name="embedding")
    inner = keras.Model(ids, L.Dense(D, name="mix")(embedding(ids)),
                        name="backbone")
    outer_ids = keras.Input((10,), dtype="int32")
    model = keras.Model(outer_ids,
                        embedding(inner(outer_ids), reverse=True))
    groups = {g.name: g for g in kc.channel_groups(model)}
    assert "called from another (nested) model" in (
        groups["backbone/embedding"].reason)
    assert not groups["backbone/mix"].prunable


@pytest.mark.parametrize("where", [
    ("keras_hub.src.models.llama.llama_layernorm", "LlamaLayerNorm", {}),
    ("keras_hub.src.models.gemma.rms_normalization", "RMSNormalization", {}),
    ("keras_hub.src.models.mobilenetv5.mobilenetv5_layers", "RmsNorm2d",
     {"dim": 6}),
], ids=["llama", "gemma", "mobilenetv5"])
def test_hub_rms_norms_are_weighed_exactly(where):
    import importlib

    pytest.importorskip("keras_hub")
    from keras_csgd.layers import handler_for

    module, name, kwargs = where
    cls = getattr(importlib.import_module(module), name)
    counts = np.array([2, 1, 3])
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype("float32")
    wide_norm = cls(**kwargs)
    wide_norm.build((2, 4, 6))
    handler = handler_for(wide_norm)
    scale = getattr(wide_norm, handler.scale)
    values = np.random.default_rng(1).uniform(0.5, 1.5, 3).astype("float32")
    scale.assign(np.repeat(values, counts))
    first = np.cumsum(counts) - counts
    expected = keras.ops.convert_to_numpy(
        wide_norm(np.repeat(x, counts, axis=-1)))[..., first]
    config = {**wide_norm.get_config(), "name": "norm"}
    weighed = handler.rebuild(config, {"counts": counts})
    weighed.build(x.shape)
    weighed.set_weights([values])
    assert relative_error(weighed(x), expected) < 1e-5


def test_mobilenet_v5_merges_exactly_through_its_rms_norms(tmp_path):
    pytest.importorskip("keras_hub")
    from hub_zoo import inputs, mobilenet_v5

    model = randomize(mobilenet_v5())
    groups = [g for g in kc.channel_groups(model) if g.prunable]
    assert groups and all(g.exact for g in groups)
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    small = kc.slim(model, plan, strict=True)
    x = inputs(model, "image")
    assert relative_error(small(x), model(x)) < 1e-4
    assert any(isinstance(layer, ClusterNormalization)
               for layer in small._flatten_layers(recursive=True))
    assert kc.count_macs(small) == kc.macs_under(model, plan)
    assert kc.count_macs(small) < 0.5 * kc.count_macs(model)


def test_latency_plans_prune_the_stream_and_csgd_plans_leave_it_out():
    model = randomize(_language_model(final_norm=False))
    hidden = _hidden(model).name

    def macs_ms(m):
        return 1.0 + kc.count_macs(m) / 1e4

    kwargs = dict(measure=macs_ms, verbose=0, verify=False)
    pruned = kc.plan_for_latency(model, 0.5, **kwargs)
    assert hidden in pruned.clusters
    merged = kc.plan_for_latency(model, 0.6, clusters="kmeans", **kwargs)
    assert merged.clusters and hidden not in merged.clusters
    kc.CSGD(merged)


def test_compensation_leaves_prune_only_groups_out():
    """CaP refits a consumer for removed inputs; behind a prune-only
    group's normalization the kept inputs change too."""
    model = randomize(_language_model(final_norm=False))
    stats = kc.methods.compensation.collect_statistics(
        model, _ids(), verbose=0)
    assert "fc2" in stats and "fc1" not in stats  # fc1 reads the stream
