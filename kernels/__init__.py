"""Kernels: the selective scan reference (PyTorch), fused kernels, and the backend dispatch."""
