"""keras_csgd: structured pruning for Keras 3 that makes models really smaller.

Channel groups (`channel_groups`), pruning plans (`PruningPlan`,
`make_plan`), optimizers (`CSGD`, `GSM`), callbacks (`callbacks`), methods for
pre-trained models (`methods`) and surgery (`slim`) that builds the narrower
model with merged weights; `export` writes it for a runtime (`runtimes`:
LiteRT float32 or int8, ONNX Runtime, OpenVINO, TensorFlow) and `latency`
plans to a latency measured on one.
"""

from keras_csgd import (
    callbacks,
    data,
    layers,
    methods,
    models,
    optimizers,
    runtimes,
)
from keras_csgd.clusters import make_plan
from keras_csgd.flops import count_macs, macs_under
from keras_csgd.fold import fold_batchnorm
from keras_csgd.graph import channel_groups
from keras_csgd.groups import ChannelGroup
from keras_csgd.latency import plan_for_latency
from keras_csgd.latency.bench import benchmark_latency
from keras_csgd.layers import register_layer
from keras_csgd.optimizers.centripetal_sgd import CSGD
from keras_csgd.optimizers.global_sparse_momentum import GSM
from keras_csgd.optimizers.spread import cluster_spread
from keras_csgd.plan import PruningPlan
from keras_csgd.recover import fine_tune
from keras_csgd.runtimes.exporter import export, export_tflite
from keras_csgd.scoring import plan_from_scores
from keras_csgd.sparsity import sparsify, sparsity_report
from keras_csgd.surgery import slim

__version__ = "0.1.0"
