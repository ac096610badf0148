"""Evaluation: lm-eval harness model, needle-in-a-haystack, MQAR and recency/over-smoothing diagnostics."""
