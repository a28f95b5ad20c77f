"""keras_hub's zoo, family by family (issue 23): what holds today.

Every family of `hub_zoo.FAMILIES` is built small with random weights and
checked for what must hold whatever the analysis sees: the identity plan
(every prunable group kept whole; empty where nothing is prunable yet)
slims exactly, MACs are honest (equal to an independent count of every
Conv/Dense/EinsumDense call within 5%, and a warning names what is not
counted), and the slim model's MACs equal `macs_under`. Families with
prunable groups are collapsed at keep=0.5 and slimmed exactly. The tables
below are the expectations as they stand: they may only grow.
"""

import warnings

import keras
import pytest

import keras_csgd as kc
from hub_zoo import FAMILIES, inputs, outputs
from keras_csgd.runtimes import litert
from mac_reference import reference_macs
from utils import collapse, relative_error

pytest.importorskip("keras_hub")

# Prunable groups each family has at least.
MIN_GROUPS = {"CSPNet": 8, "ResNetV2": 4, "BERT": 2, "RetinaNet": 8,
              "DeepLabV3": 6, "Gemma": 4, "Gemma3": 4, "Llama": 4,
              "Mistral": 4, "Phi3": 4, "Qwen2": 4, "Qwen3": 4, "GPT2": 3,
              "MobileNetV5": 5, "DeiT": 2, "DINOv2": 2, "Swin": 3, "MiT": 5,
              "SegFormer": 7, "D-FINE": 40, "ResNet": 8, "VGG": 2,
              "DenseNet": 6, "Xception": 4, "EfficientNet": 8, "ViT": 2,
              "DINOv3": 2, "ViTDet": 4, "DistilBERT": 2, "RoBERTa": 2,
              "XLM-RoBERTa": 2, "ELECTRA": 3, "ALBERT": 3,
              "DeBERTaV3": 2}
# Calls `count_macs` names as not counted, by family: D-FINE's `map`s of a
# Python function (gathers, which cost nothing); none elsewhere.
UNCOUNTED = {"D-FINE": 3}
def _error(a, b):
    return max(keras.tree.flatten(keras.tree.map_structure(
        relative_error, a, b)))


def _macs(model, family, plan=None):
    """(`count_macs` or `macs_under`, names it warned were not counted)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shape = family.input_shape
        macs = (kc.count_macs(model, input_shape=shape) if plan is None
                else kc.macs_under(model, plan, input_shape=shape))
    return macs, [str(w.message) for w in caught
                  if "not counted" in str(w.message)]


def _identity_plan(model):
    groups = kc.channel_groups(model)
    return kc.PruningPlan(
        {g.name: [[i] for i in range(g.size)] for g in groups if g.prunable},
        groups=groups)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_identity_plan_is_exact_and_macs_are_honest(name):
    family = FAMILIES[name]
    model = family.build()
    plan = _identity_plan(model)
    assert len(plan.clusters) >= MIN_GROUPS.get(name, 0)
    x = inputs(model, family.kind)
    small = kc.slim(model, plan)
    assert _error(small(x), model(x)) == 0.0
    macs, uncounted = _macs(model, family)
    reference = reference_macs(model, inputs(model, family.kind, n=1))
    assert macs == pytest.approx(reference, rel=0.05)
    assert len(uncounted) == (name in UNCOUNTED)
    assert all(f"MACs of {UNCOUNTED[name]} call(s) are not counted" in w
               for w in uncounted)
    assert _macs(small, family)[0] == _macs(model, family, plan)[0] == macs


@pytest.mark.parametrize("name", sorted(MIN_GROUPS))
def test_collapsed_family_slims_exactly(name):
    family = FAMILIES[name]
    model = family.build()
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    x = inputs(model, family.kind)
    small = kc.slim(model, plan)
    assert _error(outputs(small, x, model), outputs(model, x)) < 1e-4
    slim_macs = _macs(small, family)[0]
    assert slim_macs == _macs(model, family, plan)[0]
    # Issue 23's target; GPT-2 keeps its heads whole, and its class (issue
    # 24): `make_plan` keeps its hidden width whole (its LayerNorms cannot
    # weigh merged channels), from which it derives the head size.
    bound = 0.8 if name == "GPT2" else 0.65
    assert slim_macs <= bound * _macs(model, family)[0]


@pytest.mark.parametrize("name", ["DeiT", "DINOv2"])
def test_stream_of_a_vision_transformer_with_a_head_slims_exactly(name):
    # The backbone's own output keeps its width; under a head (on the class
    # token), the stream prunes: its class token, position embedding and
    # LayerNormalizations are members, read in the traced embeddings.
    family = FAMILIES[name]
    backbone = family.build()
    model = keras.Model(backbone.input, keras.layers.Dense(3, name="head")(
        backbone.output[:, 0]))
    stream = [g for g in kc.channel_groups(model)
              if g.prunable and g.size == backbone.output.shape[-1]]
    assert stream and stream[0].exact
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    x = inputs(model, family.kind)
    small = kc.slim(model, plan)
    assert _error(small(x), model(x)) < 1e-4
    slim_macs = _macs(small, family)[0]
    assert slim_macs == _macs(model, family, plan)[0]
    assert slim_macs <= 0.65 * _macs(model, family)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_slim_model_keras_round_trip(name, tmp_path):
    family = FAMILIES[name]
    model = family.build()
    plan = kc.make_plan(model, keep=0.5, method="kmeans") if (
        name in MIN_GROUPS) else kc.PruningPlan({})
    small = kc.slim(model, plan)
    # The slim model is a functional model whose layers save one by one
    # (the original saves as its Backbone class, by its arguments).
    small.save(tmp_path / "slim.keras")
    loaded = keras.saving.load_model(tmp_path / "slim.keras")
    x = inputs(model, family.kind)
    # A `.keras` file holds the outputs' tuples as lists (JSON: D-FINE's).
    same = keras.tree.lists_to_tuples
    assert _error(same(loaded(x)), same(small(x))) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["CSPNet", "ResNetV2", "DeiT", "Swin"])
def test_slim_model_exports_to_litert(name, tmp_path):
    family = FAMILIES[name]
    model = family.build()
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    small = kc.slim(model, plan)
    x = inputs(model, family.kind, n=8)
    result = kc.export_tflite(small, tmp_path / "slim.tflite")
    actual = litert.run_tflite(result.path, x)
    assert relative_error(actual, small(x)) <= litert.TOLERANCES[None]
