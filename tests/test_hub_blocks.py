"""keras_hub backbones built from composite blocks and `keras.ops` calls.

Small configs with random weights (no download). Their blocks are seen
through (traced), their `keras.ops` calls have channel rules; each model is
checked against itself: identity plan exact, collapse-then-slim exact,
`macs_under` equal to the slim model's MACs, `.keras` round trip.
"""

import keras
import numpy as np
import pytest

import keras_csgd as kc
from keras_csgd import graph
from utils import collapse, relative_error
from zoo import randomize

keras_hub = pytest.importorskip("keras_hub")


def mobilenetv3():
    """Inverted residual blocks, squeeze-and-excite, hard-swish, grouped
    convolutions used as depthwise ones."""
    return keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[16], [24, 32]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[16], [16, 16]],
        stackwise_kernel_size=[[3], [3, 5]],
        stackwise_num_strides=[[2], [1, 1]],
        stackwise_se_ratio=[[None], [None, 0.25]],
        stackwise_activation=[["relu"], ["relu", "hard_swish"]],
        stackwise_padding=[[1], [1, 2]],
        output_num_filters=32, input_activation="hard_swish",
        output_activation="hard_swish", input_num_filters=16,
        image_shape=(32, 32, 3), depthwise_filters=8, squeeze_and_excite=0.5,
        depthwise_stride=2, depthwise_residual=False, last_layer_filter=40,
    )


def efficientnetv2():
    """Fused and unfused MBConv blocks (an activation called twice)."""
    return keras_hub.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3],
        stackwise_num_repeats=[1, 2, 1],
        stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 24],
        stackwise_expansion_ratios=[1, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25],
        stackwise_strides=[1, 2, 2],
        stackwise_block_types=["fused", "fused", "unfused"],
        width_coefficient=1.0, depth_coefficient=1.0,
        input_shape=(32, 32, 3), num_features=32,
    )


def cspnet():
    """`ops.split` of the channels, and concatenation back."""
    return keras_hub.models.CSPNetBackbone(
        stem_filters=16, stem_kernel_size=3, stem_strides=2,
        stackwise_depth=[1, 2], stackwise_strides=[1, 2],
        stackwise_num_filters=[16, 32], block_type="bottleneck_block",
        stage_type="csp", bottle_ratio=[0.5], block_ratio=[1.0],
        expand_ratio=[2.0], image_shape=(32, 32, 3),
    )


def resnetv2():
    """Pre-activation blocks and `ops.pad` before the max pooling."""
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[16], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32], stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2], block_type="bottleneck_block",
        use_pre_activation=True, image_shape=(32, 32, 3),
    )


def hgnetv2():
    """HGNetV2's encoder of composite stages, blocks and light convs."""
    return keras_hub.models.HGNetV2Backbone(
        depths=[1, 1], embedding_size=16, hidden_sizes=[32, 64],
        stem_channels=[3, 8, 16], hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[(16, 8, 32, 1, 2, 3),
                                 (32, 16, 64, 1, 2, 3)],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True], image_shape=(32, 32, 3),
    )


def _encoder():
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32, 32, 32],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block", image_shape=(32, 32, 3),
    )


def retinanet():
    """A feature pyramid (a composite layer) over a ResNet."""
    return keras_hub.models.RetinaNetBackbone(
        image_encoder=_encoder(), min_level=3, max_level=5, use_p5=False,
        image_shape=(32, 32, 3),
    )


def deeplabv3():
    """Spatial pyramid pooling (a composite layer with `Resizing`)."""
    return keras_hub.models.DeepLabV3Backbone(
        image_encoder=_encoder(), spatial_pyramid_pooling_key="P4",
        upsampling_size=4, dilation_rates=[2, 4], low_level_feature_key="P2",
        projection_filters=16, image_shape=(32, 32, 3),
    )


MODELS = {f.__name__: f for f in (mobilenetv3, efficientnetv2, cspnet,
                                  resnetv2, hgnetv2, retinanet, deeplabv3)}


def _error(a, b):
    return max(keras.tree.flatten(keras.tree.map_structure(
        relative_error, a, b)))


def _images(n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(
        "float32")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hub_backbone_prunes_and_slims_exactly(name, tmp_path):
    model = randomize(MODELS[name]())
    groups = kc.channel_groups(model)
    x = _images()
    identity = kc.PruningPlan(
        {g.name: [[i] for i in range(g.size)] for g in groups if g.prunable},
        groups=groups,
    )
    assert _error(kc.slim(model, identity)(x), model(x)) == 0.0
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    small = kc.slim(model, plan)
    assert _error(small(x), model(x)) < 1e-4
    macs = kc.count_macs(small)
    assert macs == kc.macs_under(model, plan)
    assert macs <= 0.65 * kc.count_macs(model)
    path = tmp_path / "slim.keras"
    small.save(path)
    assert _error(keras.saving.load_model(path)(x), small(x)) == 0.0


def test_traced_mobilenetv3_blocks_compute_what_the_blocks_do():
    model = randomize(mobilenetv3())
    an = graph.analyze(model)
    assert {"block_1_0", "block_2_1", "block_2_1/block_2_1_se"} <= set(
        an.traced)
    rng = np.random.default_rng(0)
    for name in ("block_1_0", "block_2_1"):
        block, traced = model.get_layer(name), an.traced[name]
        assert not any(isinstance(op, type(block))
                       for op in traced.operations)
        x = rng.normal(size=(2, *block.input.shape[1:])).astype("float32")
        np.testing.assert_array_equal(traced(x), block(x))


@pytest.mark.parametrize(
    "build",
    [
        lambda: keras_hub.models.LlamaBackbone(
            vocabulary_size=50, num_layers=1, num_query_heads=4,
            num_key_value_heads=2, hidden_dim=16, intermediate_dim=24),
        lambda: keras_hub.models.GPT2Backbone(
            vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
            intermediate_dim=24, max_sequence_length=8),
    ],
    ids=["llama", "gpt2"],
)
def test_decoder_blocks_analyse_and_freeze_with_reasons(build):
    groups = kc.channel_groups(build())
    assert all(g.reason for g in groups if not g.prunable)
    # Heads and MLP units prune (test_decoders.py).
    assert sum(g.prunable for g in groups) >= 2
    reasons = " ".join(g.reason for g in groups if not g.prunable)
    assert "token ids of `token_embedding`" in reasons


def test_dinov2_heads_and_mlps_prune_through_layer_scales():
    model = randomize(keras_hub.models.DINOV2Backbone(
        patch_size=4, num_layers=1, hidden_dim=16, num_heads=2,
        intermediate_dim=24, image_shape=(16, 16, 3),
        position_embedding_shape=(16, 16, 3)))
    groups = {g.name: g for g in kc.channel_groups(model) if g.prunable}
    assert len(groups) == 2  # the heads and the MLP's hidden units
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(
        "float32")
    small = kc.slim(model, plan)
    assert _error(small(x), model(x)) < 1e-4
    assert kc.count_macs(small) == kc.macs_under(model, plan)
