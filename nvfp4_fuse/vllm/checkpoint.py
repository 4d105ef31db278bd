"""What a DeepSeek-V4 checkpoint's ``quantization_config`` says about its routed experts.

No vLLM, no torch (the fused target comes from ``nvfp4_fuse.targets``, numpy), so it can be read
and tested anywhere. The plugin asks it: are this checkpoint's routed experts NVFP4 (so vLLM's
MegaMoE must be built with ``MEGA_MOE_NVFP4``), and are they stored fused, in which target.

Recipes it has to tell apart:

- NVIDIA ModelOpt (``nvidia/DeepSeek-V4-*-NVFP4``): ``moe_quant_algo: NVFP4`` plus a manifest,
  ``quantized_layers`` keyed by ``layers.N.ffn.experts`` (older exports: per projection,
  ``layers.N.ffn.experts.E.w1``) and ``ignore`` / ``exclude_modules`` patterns. MTP experts are
  left MXFP4 by default (``mtp.*`` in ``ignore``) and listed in ``quantized_layers`` only when the
  recipe's ``--include_mtp_experts`` converted them.
- canada-quant (``DeepSeek-V4-Pro-NVFP4-FP8-MTP``): ``moe_quant_algo: NVFP4`` and no manifest; its
  ``mtp.*`` block is byte-identical to the MXFP4 source.
- ``nvfp4-fuse convert`` output: the source's keys plus a ``fused_experts`` block naming the layout.

So: a module listed in ``quantized_layers`` is NVFP4 if its entry says so; without a manifest the
``layers.N`` experts are NVFP4 and the MTP experts keep MXFP4.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..targets import Target

FUSED_BLOCK_KEY = "fused_experts"
FUSED_TARGET = "mega-moe"  # the target vLLM's NVFP4 MegaMoE parameters hold as they are
# Layout versions this plugin reads (fused.py: the mega-moe contract; fused_per_expert.py: the rest).
KNOWN_LAYOUTS = frozenset({"nvfp4-fuse/v2"})


class FusedLayoutError(ValueError):
    """A fused checkpoint this plugin cannot read (unknown layout version or target)."""


@dataclass(frozen=True)
class ExpertCheckpoint:
    """The routed-expert facts of one checkpoint, from ``config.json``'s ``quantization_config``."""

    moe_quant_algo: str = ""
    fused: Mapping[str, Any] | None = None
    quantized_layers: Mapping[str, Any] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()

    @classmethod
    def from_quant_config(cls, qc: Mapping[str, Any] | None) -> ExpertCheckpoint:
        qc = qc if isinstance(qc, Mapping) else {}
        fused = qc.get(FUSED_BLOCK_KEY)
        layers = qc.get("quantized_layers")
        excluded: list[str] = []
        for key in ("ignore", "exclude_modules"):
            pats = qc.get(key)
            if isinstance(pats, (list, tuple)):
                excluded += [p for p in pats if isinstance(p, str)]
        return cls(
            moe_quant_algo=str(qc.get("moe_quant_algo") or "").upper(),
            fused=fused if isinstance(fused, Mapping) else ({} if fused is not None else None),
            quantized_layers=layers if isinstance(layers, Mapping) else {},
            excluded=tuple(excluded),
        )

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> ExpertCheckpoint:
        return cls.from_quant_config(getattr(hf_config, "quantization_config", None))

    @property
    def is_fused(self) -> bool:
        return self.fused is not None

    @property
    def has_nvfp4_experts(self) -> bool:
        """Whether the plugin has anything to do for this checkpoint."""
        return self.moe_quant_algo == "NVFP4" or self.is_fused

    def check_layout(self) -> None:
        """Refuse a fused checkpoint this plugin does not know how to read, with one clear error."""
        if self.fused is not None:
            self.fused_target()

    def fused_target(self) -> Target | None:
        """The ``nvfp4-fuse`` target (row order, scale layout, scalar policies) the experts are fused
        in, from the ``fused_experts`` block; ``None`` for a per-expert checkpoint.
        ``FusedLayoutError`` for a layout version or target this plugin does not read, or a block
        whose choices disagree with its target's."""
        if self.fused is None:
            return None
        from ..errors import InputError
        from ..targets import TARGETS, get_target

        layout = self.fused.get("layout")
        name = self.fused.get("target")
        if layout not in KNOWN_LAYOUTS:
            raise FusedLayoutError(
                f"nvfp4-fuse: this checkpoint's experts are fused in layout {layout!r} "
                f"(quantization_config.{FUSED_BLOCK_KEY}.layout), which this plugin does not read; "
                f"it reads {', '.join(sorted(KNOWN_LAYOUTS))}. Convert the per-expert checkpoint "
                "again with this nvfp4-fuse, or install the nvfp4-fuse version that wrote it."
            )
        if name not in TARGETS:
            raise FusedLayoutError(
                f"nvfp4-fuse: this checkpoint's experts are fused for target {name!r} "
                f"(quantization_config.{FUSED_BLOCK_KEY}.target); this plugin reads targets "
                f"{', '.join(TARGETS)}."
            )
        rows = self.fused.get("w13_rows")
        if TARGETS[name].user_row_order and rows is None:
            raise FusedLayoutError(
                f"nvfp4-fuse: target {name!r} needs quantization_config.{FUSED_BLOCK_KEY}.w13_rows "
                "(gate-up or up-gate), which this checkpoint's config does not have"
            )
        try:
            target = get_target(name, rows if TARGETS[name].user_row_order else "gate-up")
        except InputError as e:
            raise FusedLayoutError(f"nvfp4-fuse: quantization_config.{FUSED_BLOCK_KEY}: {e}") from None
        described = target.describe()
        for key in ("w13_rows", "scale_layout", "w13_weight_scale_2", "w13_input_scale", "values"):
            if key in self.fused and self.fused[key] != described[key]:
                raise FusedLayoutError(
                    f"nvfp4-fuse: quantization_config.{FUSED_BLOCK_KEY}.{key} is {self.fused[key]!r}, "
                    f"but target {name!r} of layout {layout} writes {described[key]!r}; the config "
                    "does not describe a layout this plugin reads"
                )
        return target

    def experts_are_nvfp4(self, module: str) -> bool:
        """Whether the routed experts at checkpoint prefix ``module`` (``layers.3.ffn.experts``,
        ``mtp.0.ffn.experts``) are NVFP4 in this checkpoint."""
        if not self.has_nvfp4_experts:
            return False
        if any(fnmatch.fnmatchcase(module, p) for p in self.excluded):
            return False
        listed = [
            v for k, v in self.quantized_layers.items() if k == module or k.startswith(module + ".")
        ]
        if listed:
            return all(
                isinstance(v, Mapping) and str(v.get("quant_algo", "")).upper() == "NVFP4" for v in listed
            )
        if self.quantized_layers:
            return False  # a manifest that does not list this module: not converted
        return not module.startswith("mtp.")


def checkpoint_module(layer_index: int, num_hidden_layers: int) -> str:
    """The checkpoint prefix of the routed experts of vLLM decoder layer ``layer_index`` (the MTP
    layers are built as layers ``num_hidden_layers + k`` and stored as ``mtp.k``)."""
    if layer_index >= num_hidden_layers:
        return f"mtp.{layer_index - num_hidden_layers}.ffn.experts"
    return f"layers.{layer_index}.ffn.experts"
