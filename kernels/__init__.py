"""Hand-written Triton kernels, each beside its torch reference implementation."""
