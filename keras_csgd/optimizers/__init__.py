"""Optimizers: centripetal SGD (C-SGD) and global sparse momentum (GSM)."""

from keras_csgd.optimizers.centripetal_sgd import CSGD
from keras_csgd.optimizers.global_sparse_momentum import GSM
from keras_csgd.optimizers.spread import cluster_spread, collapse_strength
