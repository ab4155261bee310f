"""Sparse linear algebra for thresholded activations: torch reference, Triton kernels, dispatch."""

from thresher.kernels.reference import sparse_linear_reference, threshold_activations

__all__ = ["sparse_linear_reference", "threshold_activations"]
