"""Pretraining: data preparation, the training engine, checkpoints, and the `polar` CLI."""
