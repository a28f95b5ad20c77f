"""Pruning methods that start from a trained model."""
