"""What the entry points run, as library functions: one pretraining run (``pretraining.run``)."""
