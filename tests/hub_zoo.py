"""keras_hub backbones of 37 families (issue 23), in small configs.

Each family is built from a config with random weights (no preset, no
download), small enough that the harness (`tests/test_hub_zoo.py`) and the
coverage script (`benchmarks/hub_coverage.py`) build, slim and count all of
them on two cores in minutes. One place for these configs: the tracing and
transformer work reuse them.

The families are the keras_hub 0.32 backbones issue 23 was filed on, as
far as it names them (its table, plus ResNet, VGG, DenseNet, Xception,
EfficientNet, ViT, DistilBERT, RoBERTa, ELECTRA, ALBERT and DeBERTaV3),
and XLM-RoBERTa, DINOv3 and ViTDet for the three it does not name.

`FAMILIES` maps a family name to a `HubFamily`: how to build it, how to
make inputs for it, and the sequence length a text model is counted at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

IMAGE = 32
TOKENS = 12
VOCABULARY = 64


@dataclasses.dataclass(frozen=True)
class HubFamily:
    """One keras_hub family of the zoo.

    Attributes:
        build: `() -> keras.Model`, a small backbone with random weights.
        kind: `"image"` or `"text"` (token ids and a padding mask).
        input_shape: the per-example input shape MACs are counted at, for
            a text model (its sequence length is dynamic); `None` for an
            image model (its input is static).
    """

    build: Callable
    kind: str = "image"

    @property
    def input_shape(self):
        return (TOKENS,) if self.kind == "text" else None


def inputs(model, kind: str, n: int = 2, seed: int = 0):
    """Random inputs for `model`: images, or token ids and a mask."""
    rng = np.random.default_rng(seed)
    if kind == "text":
        data = {
            "token_ids": rng.integers(0, VOCABULARY, (n, TOKENS)),
            "padding_mask": np.ones((n, TOKENS), "int32"),
        }
        if "segment_ids" in model.input:
            data["segment_ids"] = rng.integers(0, 2, (n, TOKENS))
        return {k: v.astype("int32") for k, v in data.items()}
    shape = (n, *model.inputs[0].shape[1:])
    return rng.uniform(0, 1, shape).astype("float32")


def outputs(model, x, original=None):
    """`model(x)`, or, for a decoder LLM backbone (or its slim model), its
    logits over the vocabulary through its token embedding: the backbone's
    own output narrows with a merged hidden width, the logits do not.
    `original`: the model `model` was slimmed from. Defaults to `model`."""
    from keras_csgd.layers.embedding import output_projection

    y = model(x)
    embedding = output_projection(original or model)
    if embedding is None:
        return y
    return model.get_layer(embedding.name)(y, reverse=True)


def _hub():
    import keras_hub

    return keras_hub.models


def mobilenet_v3():
    return _hub().MobileNetBackbone(
        stackwise_expansion=[[16, 32], [48]],
        stackwise_num_blocks=[2, 1],
        stackwise_num_filters=[[8, 8], [16]],
        stackwise_kernel_size=[[3, 3], [5]],
        stackwise_num_strides=[[2, 1], [2]],
        stackwise_se_ratio=[[None, None], [0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish"],
                              ["hard_swish"]],
        stackwise_padding=[[1, 1], [2]],
        output_num_filters=32, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, squeeze_and_excite=0.5,
        last_layer_filter=48, input_num_filters=8,
        image_shape=(IMAGE, IMAGE, 3),
    )


def mobilenet_v5():
    return _hub().MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir", "uir"]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[16], [24, 24]],
        stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["relu", "relu"]],
        stackwise_exp_ratios=[[2.0], [2.0, 2.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]],
        stackwise_dw_kernel_sizes=[[0], [3, 3]],
        stackwise_dw_start_kernel_sizes=[[0], [0, 0]],
        stackwise_dw_end_kernel_sizes=[[0], [0, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]],
        stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 0]],
        stackwise_key_dims=[[0], [0, 0]],
        stackwise_value_dims=[[0], [0, 0]],
        stackwise_kv_strides=[[0], [0, 0]],
        stackwise_use_cpe=[[False], [False, False]],
        image_shape=(IMAGE, IMAGE, 3), stem_size=8, use_msfa=False,
    )


def efficientnet_v2():
    return _hub().EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3],
        stackwise_num_repeats=[1, 2, 1],
        stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 24],
        stackwise_expansion_ratios=[1, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25],
        stackwise_strides=[1, 2, 2],
        stackwise_block_types=["fused", "fused", "unfused"],
        stackwise_force_input_filters=[0] * 3,
        stackwise_nores_option=[False] * 3,
        width_coefficient=1.0, depth_coefficient=1.0,
        input_shape=(IMAGE, IMAGE, 3),
    )


def hgnetv2(out_features=None):
    return _hub().HGNetV2Backbone(
        stem_channels=[3, 8, 16], embedding_size=16,
        stackwise_stage_filters=[[16, 8, 32, 1, 2, 3],
                                 [32, 16, 48, 1, 2, 3]],
        hidden_sizes=[32, 48], depths=[1, 1], hidden_act="relu",
        use_learnable_affine_block=False, apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True],
        image_shape=(IMAGE, IMAGE, 3), out_features=out_features,
    )


# Vision transformers in the proportions of their presets: patches of 4
# pixels at a width of 32 and an MLP 4 times as wide, so the patch
# embedding does 8-9% of one block's work (2-3% of a 12-block preset's;
# at patches of 8 and a width of 16 it did half of it).
_VISION = dict(patch_size=4, num_layers=1, num_heads=2, hidden_dim=32)


def deit():
    return _hub().DeiTBackbone(
        image_shape=(IMAGE, IMAGE, 3), intermediate_dim=128, **_VISION)


def dinov2():
    return _hub().DINOV2Backbone(
        intermediate_dim=128, image_shape=(IMAGE, IMAGE, 3),
        position_embedding_shape=(IMAGE, IMAGE, 3), **_VISION)


def swin():
    return _hub().SwinTransformerBackbone(
        image_shape=(IMAGE, IMAGE, 3), embed_dim=16, depths=(1, 1),
        num_heads=(1, 2), window_size=4, drop_path=0.0,
    )


def mit():
    return _hub().MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[4, 2], max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2],
        hidden_dims=[8, 16], image_shape=(IMAGE, IMAGE, 3),
    )


def segformer():
    return _hub().SegFormerBackbone(image_encoder=mit(),
                                    projection_filters=16)


def d_fine():
    return _hub().DFineBackbone(
        backbone=hgnetv2(out_features=["stage1", "stage2"]),
        decoder_in_channels=[16, 16], encoder_hidden_dim=16,
        num_labels=4, num_denoising=0, learn_initial_query=False,
        num_queries=8, anchor_image_size=(IMAGE, IMAGE), feat_strides=[4, 8],
        num_feature_levels=2, hidden_dim=16, encoder_in_channels=[32, 48],
        encode_proj_layers=[1], num_attention_heads=2, encoder_ffn_dim=32,
        num_encoder_layers=1, hidden_expansion=0.5, depth_multiplier=0.34,
        eval_idx=-1, num_decoder_layers=1, decoder_attention_heads=2,
        decoder_ffn_dim=32, decoder_n_points=[2, 2], lqe_hidden_dim=8,
        num_lqe_layers=2, image_shape=(IMAGE, IMAGE, 3), seed=0,
    )


def resnet(block_type="basic_block", pre_activation=False, blocks=(1, 1, 1),
           image_shape=(IMAGE, IMAGE, 3)):
    return _hub().ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16, 16][:len(blocks)],
        stackwise_num_blocks=list(blocks),
        stackwise_num_strides=[1, 2, 2][:len(blocks)],
        block_type=block_type, use_pre_activation=pre_activation,
        image_shape=image_shape,
    )


def resnet_v1():
    return resnet("bottleneck_block")


def vgg():
    return _hub().VGGBackbone(
        stackwise_num_repeats=[1, 2], stackwise_num_filters=[8, 16],
        image_shape=(IMAGE, IMAGE, 3),
    )


def densenet():
    return _hub().DenseNetBackbone(
        stackwise_num_repeats=[2, 2], growth_rate=8,
        image_shape=(IMAGE, IMAGE, 3),
    )


def xception():
    return _hub().XceptionBackbone(
        stackwise_conv_filters=[[8, 16], [16, 24], [24, 32]],
        stackwise_pooling=[True, True, False],
        image_shape=(IMAGE, IMAGE, 3),
    )


def efficientnet():
    return _hub().EfficientNetBackbone(
        stackwise_width_coefficients=None,
        stackwise_depth_coefficients=None,
        stackwise_kernel_sizes=[3, 3, 5],
        stackwise_num_repeats=[1, 2, 1],
        stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 24],
        stackwise_expansion_ratios=[1, 6, 6],
        stackwise_squeeze_and_excite_ratios=[0.25] * 3,
        stackwise_strides=[1, 2, 2],
        stackwise_block_types=["v1"] * 3,
        width_coefficient=1.0, depth_coefficient=1.0,
        input_shape=(IMAGE, IMAGE, 3),
    )


def vit():
    return _hub().ViTBackbone(
        image_shape=(IMAGE, IMAGE, 3), mlp_dim=128, **_VISION)


def dinov3():
    return _hub().DINOV3Backbone(
        intermediate_dim=128, num_register_tokens=2,
        image_shape=(IMAGE, IMAGE, 3), **_VISION)


def vitdet():
    return _hub().ViTDetBackbone(
        hidden_size=16, num_layers=2, intermediate_dim=32, num_heads=2,
        global_attention_layer_indices=[1], image_shape=(IMAGE, IMAGE, 3),
        patch_size=8, num_output_channels=8, window_size=2,
    )


def resnet_v2():
    return resnet("basic_block", pre_activation=True)


def retinanet():
    encoder = resnet("bottleneck_block", image_shape=(None, None, 3))
    return _hub().RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=4, use_p5=False,
        image_shape=(IMAGE * 2, IMAGE * 2, 3),
    )


def deeplab_v3():
    return _hub().DeepLabV3Backbone(
        image_encoder=resnet(image_shape=(None, None, 3)),
        spatial_pyramid_pooling_key="P4", upsampling_size=4,
        dilation_rates=[2, 4], low_level_feature_key="P2",
        projection_filters=8, image_shape=(IMAGE, IMAGE, 3),
    )


def cspnet():
    return _hub().CSPNetBackbone(
        stem_filters=8, stem_kernel_size=3, stem_strides=1,
        stackwise_depth=[1, 1], stackwise_strides=2,
        stackwise_num_filters=[16, 24], block_type="dark_block",
        stage_type="csp", down_growth=True, bottle_ratio=(0.5, 1.0),
        block_ratio=(1.0, 0.5), expand_ratio=(2.0, 1.0),
        stem_padding="same", image_shape=(IMAGE, IMAGE, 3),
    )


def bert():
    return _hub().BertBackbone(**_ENCODER)


_ENCODER = dict(vocabulary_size=VOCABULARY, num_layers=1, num_heads=2,
                hidden_dim=16, intermediate_dim=32,
                max_sequence_length=TOKENS)


def distilbert():
    return _hub().DistilBertBackbone(**_ENCODER)


def roberta():
    return _hub().RobertaBackbone(**_ENCODER)


def xlm_roberta():
    return _hub().XLMRobertaBackbone(**_ENCODER)


def deberta_v3():
    return _hub().DebertaV3Backbone(bucket_size=4, **_ENCODER)


def electra():
    config = {k: v for k, v in _ENCODER.items() if k != "vocabulary_size"}
    return _hub().ElectraBackbone(vocab_size=VOCABULARY, embedding_dim=8,
                                  **config)


def albert():
    return _hub().AlbertBackbone(embedding_dim=8, **_ENCODER)


def gpt2():
    return _hub().GPT2Backbone(**_ENCODER)


_DECODER = dict(vocabulary_size=VOCABULARY, num_layers=1,
                num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                intermediate_dim=32)


def gemma():
    return _hub().GemmaBackbone(head_dim=4, **_DECODER)


def gemma3():
    return _hub().Gemma3Backbone(image_size=16, head_dim=4, **_DECODER)


def llama():
    return _hub().LlamaBackbone(**_DECODER)


def qwen2():
    return _hub().QwenBackbone(**_DECODER)


def qwen3():
    return _hub().Qwen3Backbone(head_dim=4, **_DECODER)


def mistral():
    return _hub().MistralBackbone(**_DECODER)


def phi3():
    return _hub().Phi3Backbone(**_DECODER)


FAMILIES = {
    "MobileNetV3": HubFamily(mobilenet_v3),
    "MobileNetV5": HubFamily(mobilenet_v5),
    "EfficientNetV2": HubFamily(efficientnet_v2),
    "HGNetV2": HubFamily(hgnetv2),
    "DeiT": HubFamily(deit),
    "DINOv2": HubFamily(dinov2),
    "Swin": HubFamily(swin),
    "MiT": HubFamily(mit),
    "SegFormer": HubFamily(segformer),
    "D-FINE": HubFamily(d_fine),
    "RetinaNet": HubFamily(retinanet),
    "DeepLabV3": HubFamily(deeplab_v3),
    "CSPNet": HubFamily(cspnet),
    "ResNetV2": HubFamily(resnet_v2),
    "BERT": HubFamily(bert, "text"),
    "Gemma": HubFamily(gemma, "text"),
    "Gemma3": HubFamily(gemma3, "text"),
    "Llama": HubFamily(llama, "text"),
    "Qwen2": HubFamily(qwen2, "text"),
    "Qwen3": HubFamily(qwen3, "text"),
    "Mistral": HubFamily(mistral, "text"),
    "Phi3": HubFamily(phi3, "text"),
    "GPT2": HubFamily(gpt2, "text"),
    "ResNet": HubFamily(resnet_v1),
    "VGG": HubFamily(vgg),
    "DenseNet": HubFamily(densenet),
    "Xception": HubFamily(xception),
    "EfficientNet": HubFamily(efficientnet),
    "ViT": HubFamily(vit),
    "DINOv3": HubFamily(dinov3),
    "ViTDet": HubFamily(vitdet),
    "DistilBERT": HubFamily(distilbert, "text"),
    "RoBERTa": HubFamily(roberta, "text"),
    "XLM-RoBERTa": HubFamily(xlm_roberta, "text"),
    "ELECTRA": HubFamily(electra, "text"),
    "ALBERT": HubFamily(albert, "text"),
    "DeBERTaV3": HubFamily(deberta_v3, "text"),
}
