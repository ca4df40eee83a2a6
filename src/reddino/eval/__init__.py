"""Frozen-feature evaluation: feature extraction, k-NN, metrics and split protocols."""
