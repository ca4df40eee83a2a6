"""Self-supervised pretraining components (DINOv2 / iBOT heads, losses, centering)."""
