"""nvfp4-fuse: ModelOpt NVFP4 per-expert MoE checkpoints -> fused-expert layouts."""

__version__ = "0.1.0"
