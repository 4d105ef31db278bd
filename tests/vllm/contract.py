"""The fused ``nvfp4-fuse/v2`` (``mega-moe``) tensors, computed from a per-expert checkpoint's
content by the written contract alone (no vLLM code): what the tests hold vLLM's parameters and the
plugin's loads against.

Per expert, with gate = w1, up = w3, ``R`` = I rows each, ``K`` = input width:

- w13 values: gate row ``r`` -> ``(r // 8) * 16 + r % 8``, up row ``r`` -> the same ``+ 8``;
- block scales (E4M3 bytes, one per 16 values): four consecutive bytes make one little-endian int32
  word (byte ``j`` of word ``p`` is group ``4p + j``); then rows move within blocks:
  w1/w3 row ``64b + 16j + 8q + m`` -> w13 row ``128b + 64q + 32 half + 4m + j`` (half 0 gate, 1 up),
  w2 row ``128b + 32j + i`` -> ``128b + 4i + j``; stored MN-major, ``[K/64, N]``;
- global scales: ``w13_weight_scale_2`` = the shared w1/w3 value, ``w13_input_scale`` = max(w1, w3),
  w2's as they are.
"""

from __future__ import annotations

import numpy as np
import torch


def words(scale_bytes: torch.Tensor) -> np.ndarray:
    """[N, K/16] bytes -> [N, K/64] int32, byte j of word p = group 4p + j (little-endian)."""
    b = scale_bytes.view(torch.uint8).numpy().astype(np.uint64)
    n, g = b.shape
    b = b.reshape(n, g // 4, 4)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return w.astype(np.uint32).view(np.int32)


def w13_rows(rows: int, half: int) -> np.ndarray:
    r = np.arange(rows)
    return (r // 8) * 16 + 8 * half + r % 8


def w13_scale_rows(rows: int, half: int) -> np.ndarray:
    s = np.arange(rows)
    b, j, q, m = s // 64, (s % 64) // 16, (s % 16) // 8, s % 8
    return 128 * b + 64 * q + 32 * half + 4 * m + j


def w2_scale_rows(rows: int) -> np.ndarray:
    s = np.arange(rows)
    b, j, i = s // 128, (s % 128) // 32, s % 32
    return 128 * b + 4 * i + j


def expected_fused(content: dict[str, torch.Tensor], layer: int, experts: int) -> dict[str, np.ndarray]:
    """Stacked ``[E, ...]`` fused tensors of ``layers.<layer>.ffn.experts`` from recipe-neutral
    content (``checkpoints.source_content``)."""
    out: dict[str, list] = {}
    for x in range(experts):
        p = lambda w, f, x=x: content[f"layers.{layer}.ffn.experts.{x}.{w}.{f}"]  # noqa: E731
        gate, up, down = (p(w, "packed").numpy() for w in ("w1", "w3", "w2"))
        rows = gate.shape[0]
        w13 = np.empty((2 * rows, gate.shape[1]), np.uint8)
        w13[w13_rows(rows, 0)], w13[w13_rows(rows, 1)] = gate, up
        s13 = np.empty((2 * rows, gate.shape[1] // 32), np.int32)
        s13[w13_scale_rows(rows, 0)] = words(p("w1", "block_scale"))
        s13[w13_scale_rows(rows, 1)] = words(p("w3", "block_scale"))
        s2 = np.empty((down.shape[0], down.shape[1] // 32), np.int32)
        s2[w2_scale_rows(down.shape[0])] = words(p("w2", "block_scale"))
        assert float(p("w1", "scale_2")) == float(p("w3", "scale_2"))
        item = {
            "w13_weight": w13.view(np.int8),
            "w13_weight_scale": s13.T.copy(),
            "w13_weight_scale_2": np.float32(p("w1", "scale_2")),
            "w13_input_scale": np.float32(max(float(p("w1", "input_scale")), float(p("w3", "input_scale")))),
            "w2_weight": down.view(np.int8),
            "w2_weight_scale": s2.T.copy(),
            "w2_weight_scale_2": np.float32(p("w2", "scale_2")),
            "w2_input_scale": np.float32(p("w2", "input_scale")),
        }
        for k, v in item.items():
            out.setdefault(k, []).append(v)
    return {k: np.stack(v) for k, v in out.items()}
