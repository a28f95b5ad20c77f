"""Training callbacks: ASFP and linear filter ensembles."""

from keras_csgd.callbacks.asfp import AsymptoticSoftFilterPruning
from keras_csgd.callbacks.cluster_spread import ClusterSpread
from keras_csgd.callbacks.filter_ensembles import FilterEnsembles
