"""Numbers of the formats this project reads and writes: the bottom of the import graph (imports nothing).

NVFP4 (ModelOpt): E2M1 values, two a byte (even column in the low nibble), one E4M3 block scale per
``NVFP4_BLOCK`` values along K, a float32 ``weight_scale_2`` per tensor. MXFP4 (DeepSeek-V4's native
expert format): E2M1 values, one E8M0 scale per ``MXFP4_BLOCK`` values. The DeepGEMM MegaMoE layout
packs four E4M3 scales into an int32 word and permutes rows in blocks of 128 (UTCCP).
"""

from __future__ import annotations

NVFP4_BLOCK = 16  # values per E4M3 block scale
# |scale_2| the compare and dequant kernels take: their fp32 products stay finite below it
S2_LIMIT = 2.0**120
# The compare kernel's launch (picked on an H100, docs/benchmarks.md "## Kernels"): 16-value blocks a
# sub-tile, sub-tiles a program, warps a program. Here so a launch through the bare driver
# (driver_lane.py) uses the ones the cached binary was compiled with, without importing the kernel.
COMPARE_BPP = 64
COMPARE_NSUB = 8
COMPARE_WARPS = 2
MXFP4_BLOCK = 32  # values per E8M0 block scale
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
E4M3_HALF_STEP = 0.0625  # half an E4M3 step (3 mantissa bits), relative, in the normal range
E4M3_SUBNORMAL_HALF_SPACING = 2.0**-10  # half the spacing of E4M3 subnormals (2^-9)

GATE_UP_GROUP = 8  # rows per gate/up run in the MegaMoE L1 interleave
UTCCP_BLOCK = 128  # rows per UTCCP block
SCALES_PER_WORD = 4  # E4M3 scales per int32
K_PER_WORD = SCALES_PER_WORD * NVFP4_BLOCK  # values of K per int32 scale word
KERNEL_DIM_MULTIPLE = 512  # fp4_fp4_mega_moe: hidden % 512 == 0 and intermediate % 512 == 0
SWIZZLE_ROWS, SWIZZLE_COLS = 128, 4  # the 128x4 block-scale swizzle pads to these multiples
