"""Triton kernels for NVFP4 dequantization and verification (imported as ``nvfp4_fuse.kernels``)."""
