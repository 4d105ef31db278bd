"""The parts an output layout is composed of, each owning one decision.

- :class:`RowOrder`: where gate and up rows go in w13 (runs, and the permutation with its inverse);
- :class:`ScaleLayout`: how one expert's E4M3 block scales are stored (entry dtype and shape, shape
  rules, the numpy layout ``convert`` runs, the torch reference of it, the torch inverse ``verify``
  runs);
- :class:`Scale2Policy` and :class:`InputScalePolicy`: how gate/up ``weight_scale_2`` and the input
  scales become the stacked per-layer tensors;
- :class:`PackedValues`: the dtype the packed E2M1 bytes are declared as.

A target (``targets.py``) is one of each. Nothing outside this module looks at a part's name to decide
what to do: it asks the part. Every transform here works on one expert, so nothing holds a layer.
The numpy methods are the converter's fast path (no torch import); the ``reference_*`` and
``natural*`` methods are torch and are what the tests and ``verify`` check the fast path against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from . import host_layout
from .constants import GATE_UP_GROUP, K_PER_WORD, KERNEL_DIM_MULTIPLE, NVFP4_BLOCK

if TYPE_CHECKING:
    import torch

Run = tuple[str, int, int]  # (role "gate" | "up", first source row, row count)


# ---------------------------------------------------------------------------------------------------
# w13 row order


class RowOrder(ABC):
    """Where one expert's gate and up rows land in its w13 block ([2R, C] from two [R, C])."""

    name: ClassVar[str]

    def problems(self, rows: int) -> list[str]:
        """Why ``rows`` gate (= up) rows cannot be ordered this way (empty: they can)."""
        return []

    @abstractmethod
    def runs(self, rows: int) -> list[Run]:
        """Output rows in order, as runs of source rows: each role's runs come in source order and
        cover its rows once. The converter reads straight into the output with them."""

    def cached_runs(self, rows: int) -> tuple[Run, ...]:
        """:meth:`runs`, computed once per order and row count (row orders are stateless)."""
        return _runs(type(self), rows)

    def alternating_groups(self, rows: int) -> tuple[tuple[str, str], int] | None:
        """((first role, second role), group) when this order lays out w13 as groups of ``group`` rows
        alternating between the two roles (a whole half being one group), else None."""
        return _alternating_groups(type(self), rows)

    def permutation(self, rows: int) -> np.ndarray:
        """int64 [2R]: output row j is row ``perm[j]`` of ``[gate; up]`` stacked."""
        return _permutation(type(self), rows)

    def inverse_permutation(self, rows: int) -> np.ndarray:
        """int64 [2R]: row j of ``[gate; up]`` stacked is output row ``inv[j]``."""
        return _inverse_permutation(type(self), rows)

    def join_np(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """numpy: gate and up [R, ...] -> w13 [2R, ...] in this order."""
        return np.concatenate((gate, up))[self.permutation(gate.shape[0])]

    def split_np(self, w13: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """numpy inverse of :meth:`join_np`: w13 [2R, ...] -> (gate, up) [R, ...]. Views where each
        half is one run of rows, one strided copy a half where groups of rows alternate, else a gather."""
        rows = w13.shape[0] // 2
        alt = self.alternating_groups(rows)
        if alt is None:
            inv = self.inverse_permutation(rows)
            return w13[inv[:rows]], w13[inv[rows:]]
        first, g = alt
        groups = w13.reshape(rows // g, 2, g, *w13.shape[1:])
        half = {role: groups[:, k].reshape(rows, *w13.shape[1:]) for k, role in enumerate(first)}
        return half["gate"], half["up"]

    def join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """torch: gate and up [..., R, C] -> w13 [..., 2R, C] in this order (any dtype)."""
        import torch

        idx = torch.tensor(self.permutation(gate.shape[-2]), device=gate.device)
        return _bits_op(lambda g, u: torch.cat((g, u), dim=-2).index_select(-2, idx), gate, up)

    def split(self, w13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`join`: w13 [..., 2R, C] -> (gate, up) [..., R, C]."""
        import torch

        rows = w13.shape[-2] // 2
        inv = torch.tensor(self.inverse_permutation(rows), device=w13.device)
        both = _bits_op(lambda x: x.index_select(-2, inv), w13)
        return both[..., :rows, :], both[..., rows:, :]


# Row orders are stateless, so runs and permutations depend on the class and the row count alone.
@lru_cache(maxsize=64)
def _runs(order_cls: type[RowOrder], rows: int) -> tuple[Run, ...]:
    return tuple(order_cls().runs(rows))


@lru_cache(maxsize=64)
def _alternating_groups(order_cls: type[RowOrder], rows: int) -> tuple[tuple[str, str], int] | None:
    runs = _runs(order_cls, rows)
    if len(runs) < 2:
        return None
    roles, g = (runs[0][0], runs[1][0]), runs[0][2]
    if sorted(roles) != ["gate", "up"] or rows % g:
        return None
    if list(runs) != [(roles[i % 2], (i // 2) * g, g) for i in range(2 * rows // g)]:
        return None
    return roles, g


@lru_cache(maxsize=64)
def _permutation(order_cls: type[RowOrder], rows: int) -> np.ndarray:
    base = {"gate": 0, "up": rows}
    perm = np.concatenate([np.arange(base[role] + r0, base[role] + r0 + n) for role, r0, n in _runs(order_cls, rows)])
    perm.setflags(write=False)
    return perm


@lru_cache(maxsize=64)
def _inverse_permutation(order_cls: type[RowOrder], rows: int) -> np.ndarray:
    inv = np.argsort(_permutation(order_cls, rows))
    inv.setflags(write=False)
    return inv


def _bits_op(fn, *ts):
    """Apply a row gather to 1-byte float tensors through their uint8 view (every backend can index those)."""
    import torch

    dt = ts[0].dtype
    if dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        return fn(*(t.view(torch.uint8) for t in ts)).view(dt)
    return fn(*ts)


class GateThenUp(RowOrder):
    name = "gate-up"

    def runs(self, rows: int) -> list[Run]:
        return [("gate", 0, rows), ("up", 0, rows)]


class UpThenGate(RowOrder):
    name = "up-gate"

    def runs(self, rows: int) -> list[Run]:
        return [("up", 0, rows), ("gate", 0, rows)]


class InterleavedByGroup(RowOrder):
    """``group`` gate rows, ``group`` up rows, repeated (DeepGEMM MegaMoE's L1 order, group 8)."""

    name = "interleave8"
    group = GATE_UP_GROUP

    def problems(self, rows: int) -> list[str]:
        return [f"gate/up rows ({rows}) must be a multiple of the interleave group ({self.group})"] if rows % self.group else []

    def runs(self, rows: int) -> list[Run]:
        if self.problems(rows):
            raise ValueError(self.problems(rows)[0])
        g = self.group
        return [(role, r, g) for r in range(0, rows, g) for role in ("gate", "up")]


class W13Order(StrEnum):
    """The ``--w13-order`` choice for targets that let the user pick it."""

    GATE_UP = "gate-up"
    UP_GATE = "up-gate"

    def row_order(self) -> RowOrder:
        return GateThenUp() if self is W13Order.GATE_UP else UpThenGate()


# ---------------------------------------------------------------------------------------------------
# block-scale layout


class ScaleLayout(ABC):
    """How one expert's E4M3 block scales [rows, K/16] are stored; ``rows`` is the GEMM's N
    (2I for w13, with the rows already in the target's order), ``cols`` its K."""

    name: ClassVar[str]
    dtype: ClassVar[str]  # safetensors dtype of the stored tensor
    kernel_reads_in_place: ClassVar[bool] = False  # the Triton compare kernel reads this layout as stored
    kernel_dim_multiple: ClassVar[int] = 0  # a serving kernel's rule on hidden and intermediate sizes (0: none)

    def problems(self, rows: int, cols: int) -> list[str]:
        """Why an operand [rows, cols] does not fit this layout (empty: it fits)."""
        return []

    @abstractmethod
    def expert_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        """Shape of one expert's stored scales."""

    @abstractmethod
    def lay_out(self, raw: np.ndarray) -> np.ndarray:
        """numpy (the converter): uint8 [rows, K/16] -> the stored array."""

    @abstractmethod
    def reference_lay_out(self, scale: torch.Tensor) -> torch.Tensor:
        """torch reference of :meth:`lay_out`: E4M3 (or its uint8 bytes) [rows, K/16] -> stored tensor."""

    @abstractmethod
    def natural(self, stored: torch.Tensor, rows: int, k16: int) -> torch.Tensor:
        """torch inverse: one expert's stored scales -> float8_e4m3fn [rows, k16]."""

    def torch_dtype(self) -> torch.dtype:
        import torch

        return torch.int32 if self.dtype == "I32" else torch.uint8

    def natural_np(self, stored: np.ndarray, rows: int, cols: int) -> np.ndarray:
        """numpy inverse (verify): one expert's stored scales (as stored, or their bytes) -> uint8
        [rows, K/16]; here one gather through :meth:`natural_index`, where a layout has no closed form."""
        return np.ascontiguousarray(stored).reshape(-1).view(np.uint8).take(self.natural_index(rows, cols))

    def natural_index(self, rows: int, cols: int) -> np.ndarray:
        """:meth:`natural` as a gather: intp [rows, K/16], the byte offset in one expert's stored
        scales of each natural scale byte. Computed once per layout and shape, by running
        :meth:`natural` on stored bytes that hold their own offsets, so ``stored_bytes[index]`` is
        exactly ``natural(stored)`` (a test pins it) at the cost of one numpy take. Held as intp,
        numpy's index type: a take with any other would widen the index on every call."""
        return _natural_index(type(self), rows, cols)


@lru_cache(maxsize=64)
def _natural_index(layout: type[ScaleLayout], rows: int, cols: int) -> np.ndarray:
    import torch

    lay, k16 = layout(), cols // NVFP4_BLOCK
    shape = lay.expert_shape(rows, cols)
    n = int(np.prod(shape)) * (4 if lay.dtype == "I32" else 1)
    if n >= 1 << 31:
        raise ValueError(f"{n} bytes of scales in one expert")
    index = np.zeros((rows, k16), dtype=np.int32)
    for plane in range(-(-max(n - 1, 1).bit_length() // 8)):  # one pass per byte of an offset
        coded = torch.from_numpy((np.arange(n, dtype=np.int32) >> (8 * plane)).astype(np.uint8))
        stored = coded.view(torch.int32) if lay.dtype == "I32" else coded
        got = lay.natural(stored.reshape(shape), rows, k16).view(torch.uint8).numpy()
        index |= got.astype(np.int32) << (8 * plane)
        del coded, stored, got
    ordered = np.sort(index, axis=None)
    if ordered.size and (ordered[1:] == ordered[:-1]).any():
        raise AssertionError(f"{layout.name}: natural() reads some stored byte twice")
    del ordered
    index = index.astype(np.intp)
    index.setflags(write=False)
    _release_free_heap()
    return index


def _release_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim): building an index takes
    tens of MB of temporaries once, which the allocator would otherwise keep for the process's life."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class LinearScales(ScaleLayout):
    """ModelOpt's own [rows, K/16] bytes, untouched."""

    name = "linear"
    dtype = "F8_E4M3"

    def expert_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return (rows, cols // NVFP4_BLOCK)

    def lay_out(self, raw: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(raw)

    def reference_lay_out(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.contiguous()

    def natural(self, stored: torch.Tensor, rows: int, k16: int) -> torch.Tensor:
        import torch

        return stored.view(torch.float8_e4m3fn).reshape(rows, k16)

    def natural_np(self, stored: np.ndarray, rows: int, cols: int) -> np.ndarray:
        return stored.reshape(-1).view(np.uint8).reshape(rows, cols // NVFP4_BLOCK)


class Swizzled128x4(ScaleLayout):
    """The 128x4 swizzle of CUTLASS/FlashInfer-style NVFP4 GEMMs, each expert padded on its own."""

    name = "swizzle128x4"
    dtype = "F8_E4M3"
    kernel_reads_in_place = True

    def expert_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return host_layout.padded_shape(rows, cols // NVFP4_BLOCK)

    def lay_out(self, raw: np.ndarray) -> np.ndarray:
        return host_layout.swizzle_128x4(raw)

    def reference_lay_out(self, scale: torch.Tensor) -> torch.Tensor:
        from .swizzle import swizzle_128x4

        return swizzle_128x4(scale)

    def natural(self, stored: torch.Tensor, rows: int, k16: int) -> torch.Tensor:
        import torch

        from .swizzle import unswizzle_128x4

        return unswizzle_128x4(stored.view(torch.uint8), rows, k16).view(torch.float8_e4m3fn)

    def natural_np(self, stored: np.ndarray, rows: int, cols: int) -> np.ndarray:
        return host_layout.unswizzle_128x4(stored, rows, cols // NVFP4_BLOCK)


class MegaMoEScales(ScaleLayout):
    """DeepGEMM NVFP4 MegaMoE: int32 words of 4 E4M3, UTCCP-permuted, stored MN-major [K/64, N]."""

    name = "mega-moe"
    dtype = "I32"

    kernel_dim_multiple = KERNEL_DIM_MULTIPLE

    def problems(self, rows: int, cols: int) -> list[str]:
        return host_layout.mega_moe_shape_problems(rows, cols)

    def expert_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        return (cols // K_PER_WORD, rows)

    def lay_out(self, raw: np.ndarray) -> np.ndarray:
        return host_layout.mega_moe_scales(raw)

    def reference_lay_out(self, scale: torch.Tensor) -> torch.Tensor:
        from . import mega_moe

        return mega_moe.utccp_permute(mega_moe.pack_scales_k64(scale)).T.contiguous()

    def natural(self, stored: torch.Tensor, rows: int, k16: int) -> torch.Tensor:
        import torch

        from . import mega_moe

        words = stored.view(torch.int32).reshape(k16 * NVFP4_BLOCK // K_PER_WORD, rows)
        return mega_moe.unpack_scales_k64(mega_moe.utccp_unpermute(words.T.contiguous()))

    def natural_np(self, stored: np.ndarray, rows: int, cols: int) -> np.ndarray:
        return host_layout.mega_moe_natural(stored, rows, cols // NVFP4_BLOCK)


# ---------------------------------------------------------------------------------------------------
# global scales


def as_f32(x: np.ndarray | np.floating) -> np.ndarray:
    """A little-endian float32 array of ``x``, C order (0-d stays 0-d): what the fused scalars hold."""
    return np.array(x, dtype="<f4", order="C")


class Scale2Policy(ABC):
    """How each expert's gate and up ``weight_scale_2`` become ``w13_weight_scale_2``."""

    name: ClassVar[str]
    rescales: ClassVar[bool]  # whether unequal gate/up values make it rescale block scales

    @abstractmethod
    def w13_shape(self, experts: int) -> tuple[int, ...]: ...

    @abstractmethod
    def ratios(self, s2_gate: np.ndarray, s2_up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-expert factors for the gate and up block scales (float32 [E]; 1.0 is a pure copy)."""

    @abstractmethod
    def w13_tensor(self, s2_gate: np.ndarray, s2_up: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def split(self, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse view: stored tensor -> the scale_2 the gate and up rows decode with ([E] each)."""


class MergeByMax(Scale2Policy):
    """One value per expert, the max of gate and up; the smaller half's block scales are multiplied by
    ``s2/max`` and rounded to E4M3 (RNE), an error of at most half an E4M3 step."""

    name = "merge-max"
    rescales = True

    def w13_shape(self, experts: int) -> tuple[int, ...]:
        return (experts,)

    def ratios(self, s2_gate: np.ndarray, s2_up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        one = np.ones_like(s2_gate)
        c = np.maximum(s2_gate, s2_up)
        rg = np.where(s2_gate == c, one, s2_gate / c).astype(np.float32)
        ru = np.where(s2_up == c, one, s2_up / c).astype(np.float32)
        return rg, ru

    def w13_tensor(self, s2_gate: np.ndarray, s2_up: np.ndarray) -> np.ndarray:
        return as_f32(np.maximum(s2_gate, s2_up))

    def split(self, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return stored, stored


class InputScalePolicy(ABC):
    """How each expert's gate and up ``input_scale`` become ``w13_input_scale``."""

    name: ClassVar[str]

    @abstractmethod
    def w13_shape(self, experts: int) -> tuple[int, ...]: ...

    @abstractmethod
    def w13_tensor(self, in_gate: np.ndarray, in_up: np.ndarray) -> np.ndarray: ...


class ExpertMax(InputScalePolicy):
    """``[E]``: the max of gate and up, per expert."""

    name = "expert-max"

    def w13_shape(self, experts: int) -> tuple[int, ...]:
        return (experts,)

    def w13_tensor(self, in_gate: np.ndarray, in_up: np.ndarray) -> np.ndarray:
        return as_f32(np.maximum(in_gate, in_up))


# ---------------------------------------------------------------------------------------------------
# packed values


class PackedValues(StrEnum):
    """The safetensors dtype the packed E2M1 bytes are declared as (the bytes are the same)."""

    U8 = "U8"
    I8 = "I8"
