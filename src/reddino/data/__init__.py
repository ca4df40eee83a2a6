"""Datasets, augmentations and batch collation (iBOT masking) for RBC pretraining."""
