"""Training callbacks: ASFP, linear filter ensembles, C-SGD spread."""

from keras_csgd.callbacks.asfp import AsymptoticSoftFilterPruning
from keras_csgd.callbacks.cluster_spread import ClusterSpread
from keras_csgd.callbacks.filter_ensembles import FilterEnsembles
from keras_csgd.callbacks.macs_target import MacsTargetCallback
from keras_csgd.callbacks.skipped_steps import SkippedSteps
