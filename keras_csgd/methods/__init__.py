"""Pruning methods that start from a trained model."""

from keras_csgd.methods import adaptive, compensation
from keras_csgd.methods.activation import activation_importance
from keras_csgd.methods.ensembles import ensemble_importance
from keras_csgd.methods.functionality import functionality_plan
from keras_csgd.methods.magnitude import magnitude_plan
from keras_csgd.methods.similarity import similarity_plan
