"""The model card (README.md) a push writes: metadata through huggingface_hub's ``ModelCardData``,
then what the checkpoint is, its layout, its verification, how to serve it and how it was made. Pure."""

from __future__ import annotations

import json
from typing import Any

from ..manifest import MANIFEST_NAME

# library_name: "transformers". On the Hub, vLLM is a *local app*, not a library id: its "Use this
# model -> vLLM" snippet is shown for text-generation repos that carry the `transformers` tag
# (huggingface.js packages/tasks/src/local-apps.ts, isVllmModel), which library_name: transformers
# gives. Community NVFP4 repos and mergekit use the same value; NVIDIA's own FP4 cards use
# "Model Optimizer", which no local-app snippet recognises. The fused layout itself needs a loader
# that understands it (see "How to serve").
CARD_LIBRARY_NAME = "transformers"
CARD_TAGS = ("nvfp4", "modelopt", "fused-moe")
# What differs from one verify run to the next of the same files (or names a local path): left out, so
# the card of the same conversion is the same bytes and a second push of it is a no-op.
CARD_SKIPPED_VERIFY_KEYS = frozenset({"seconds", "peak_read_ahead", "converted", "workers"})

def _cell(v: Any) -> str:
    if isinstance(v, float):
        s = f"{v:.6g}"
    elif isinstance(v, (dict, list, tuple)):
        s = json.dumps(v, sort_keys=True)
    else:
        s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return out


def served_by_plugin(architectures: Any) -> bool:
    """Whether this package's vLLM plugin serves a fused checkpoint of a model with these
    ``config.json`` architectures (DeepSeek-V4 and V4.1, any target, any NVFP4 MoE backend). A
    manifest that does not record them (older ones) is taken to be served."""
    from ..vllm import MODEL_CLASSES

    if not isinstance(architectures, list):
        return True
    return any(a in MODEL_CLASSES for a in architectures)


def default_serve_hint(target: str, repo_id: str, architectures: Any = None) -> str:
    """How to serve a pushed checkpoint of ``target`` (the target's own hint, where the plugin serves
    the model; else where to find the layout's description)."""
    from ..targets import TARGETS

    t = TARGETS.get(target)
    if t is None:
        return f"# target {target}: no known loader reads this layout"
    if not t.per_expert and not served_by_plugin(architectures):
        return (
            f"# {', '.join(architectures) or 'this model'}: no released loader reads fused expert tensors for it yet\n"
            "# (the nvfp4-fuse vLLM plugin serves DeepSeek-V4 and V4.1); the layout is described in\n"
            "# config.json (quantization_config.fused_experts).\n"
            f"hf download {repo_id}"
        )
    return t.serve_hint.format(repo_id=repo_id)


def card_library_name(target: str, architectures: Any = None) -> str | None:
    """``library_name`` for a checkpoint of ``target``: ``transformers`` (see above) where vLLM serves
    it (per-expert output: as it is, by any engine; fused: through this package's plugin), none where no
    loader reads it: the card claims no library."""
    from ..targets import TARGETS

    t = TARGETS.get(target)
    served = t is not None and (t.per_expert or served_by_plugin(architectures))
    return CARD_LIBRARY_NAME if served else None


def _source_text(source: dict[str, Any]) -> str | None:
    for key in ("repo_id", "repo", "id", "path"):
        if source.get(key):
            rev = source.get("revision")
            return f"{source[key]}" + (f" (revision {rev})" if rev else "")
    return None


def render_model_card(
    *,
    base_model: str | None,
    repo_id: str | None,
    manifest: dict,
    verify_summary: dict | None,
    serve_hint: str,
) -> str:
    """README.md text for a pushed conversion. Pure: no I/O.

    ``manifest`` is the manifest JSON (``Manifest.to_json()``). ``verify_summary`` (optional) is a dict;
    its ``layers`` entry (a list of per-layer dicts, or a dict layer -> dict) becomes a table and its
    other scalar entries a list. ``serve_hint`` is the shell snippet for serving ("" -> the default
    for the manifest's target, see ``default_serve_hint``). ``repo_id`` ``None``: the card ``convert``
    writes into its output, before any push (it names no repo and no local path).
    """
    target = str(manifest.get("target", "?"))
    layout = str(manifest.get("layout", "?"))
    tool_version = str(manifest.get("tool_version", "?"))
    options = manifest.get("options") or {}
    source = manifest.get("source") or {}
    files = manifest.get("files") or {}
    name = repo_id.split("/")[-1] if repo_id else (f"{base_model.split('/')[-1]} ({target})" if base_model else f"NVFP4 fused-expert checkpoint ({target})")

    from huggingface_hub import ModelCardData

    extra = {"base_model_relation": "quantized"} if base_model else {}
    archs = source.get("architectures") if isinstance(source, dict) else None
    data = ModelCardData(base_model=base_model, library_name=card_library_name(target, archs), tags=list(CARD_TAGS), **extra)
    fm = ["---", data.to_yaml(), "---"]

    body: list[str] = ["", f"# {name}", "", "## What this is", ""]
    base_txt = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a ModelOpt NVFP4 checkpoint"
    from ..targets import TARGETS

    t = TARGETS.get(target)
    if t is not None and t.per_expert:
        body.append(
            f"An NVFP4 (ModelOpt) mixture-of-experts checkpoint repaired from {base_txt} by nvfp4-fuse "
            f"(target `{target}`): one tensor set per expert as before, in ModelOpt's spelling, with each "
            f"expert's gate and up `weight_scale_2` made equal (the smaller half's FP8 block scales rescaled), "
            f"gate and up `input_scale` made equal, and missing or zero input scales replaced by the layer's "
            f"largest of the same projection. Nothing is re-quantized from higher precision: the 4-bit codes are "
            f"copied; the `repaired_experts` block in config.json records what changed."
        )
    else:
        body.append(
            f"An NVFP4 (ModelOpt) mixture-of-experts checkpoint converted from {base_txt} by "
            f"nvfp4-fuse from one tensor set per expert into fused-expert tensors "
            f"(`w13_*` = gate+up, `w2_*` = down, one tensor per layer stacked over experts), laid out for "
            f"target `{target}`. Nothing is re-quantized from higher precision: the 4-bit codes are copied, the "
            f"FP8 block scales are re-laid out for the target (targets that merge the gate/up global scales also "
            f"rescale one half's block scales; the `fused_experts` block in config.json records which)."
        )
    body += ["", "## Layout", "", "| | |", "|---|---|"]
    body.append(f"| target | `{target}` |")
    body.append(f"| layout version | `{layout}` |")
    total = sum(int(r.get("size", 0)) for r in files.values()) if isinstance(files, dict) else 0
    if files:
        body.append(f"| files | {len(files)} ({total / 2**30:.2f} GiB) |")
    body += ["", "Options:", ""]
    if options:
        body += ["| option | value |", "|---|---|"]
        body += [f"| `{_cell(k)}` | `{_cell(v)}` |" for k, v in sorted(options.items())]
    else:
        body.append("(defaults)")

    if verify_summary:
        body += ["", "## Verification", ""]
        layers = verify_summary.get("layers")
        for k, v in verify_summary.items():
            if k in CARD_SKIPPED_VERIFY_KEYS:
                continue
            if k != "layers" and not isinstance(v, (dict, list)):
                body.append(f"- {k}: {_cell(v)}")
        if isinstance(layers, dict):
            layers = [{"layer": k, **(v if isinstance(v, dict) else {"result": v})} for k, v in layers.items()]
        if isinstance(layers, list) and layers:
            body.append("")
            body += _table([r if isinstance(r, dict) else {"result": r} for r in layers])

    hint = serve_hint or default_serve_hint(target, repo_id or "<this folder>", archs)
    body += ["", "## How to serve", "", "```bash", hint.rstrip(), "```"]

    body += ["", "## How it was produced", ""]
    cmd = source.get("command") if isinstance(source, dict) else None
    if not cmd:
        src = _source_text(source) if isinstance(source, dict) else None
        cmd = f"nvfp4-fuse convert {src.split(' ')[0] if src else '<source>'} <out> --target {target}"
    body += ["```bash", str(cmd)] + ([f"nvfp4-fuse push <out> {repo_id}"] if repo_id else []) + ["```", ""]
    src_txt = _source_text(source) if isinstance(source, dict) else None
    if src_txt:
        body.append(f"- source: `{src_txt}`")
    body.append(f"- tool: nvfp4-fuse {tool_version}")
    for k in ("input_fingerprint", "options_fingerprint"):
        if manifest.get(k):
            body.append(f"- {k.replace('_', ' ')}: `{manifest[k]}`")
    if repo_id:
        body.append(
            f"- `{MANIFEST_NAME}` lists every file with its size and sha256; `nvfp4-fuse push` checked the "
            "Hub's copies against it after uploading."
        )
    else:
        body.append(f"- `{MANIFEST_NAME}` lists every file with its size and sha256; `nvfp4-fuse verify` checks them.")
    return "\n".join(fm + body) + "\n"


def push_card(manifest: dict, repo_id: str, *, base_model: str | None = None, verify_summary: dict | None = None) -> str:
    """The card a push to ``repo_id`` uploads as README.md (``push``, ``convert --push-to``):
    ``base_model`` defaults to the source the manifest records, when that is a repo id and not a
    local folder."""
    from pathlib import Path

    rec = manifest.get("source")
    src = rec.get("source") if isinstance(rec, dict) else None
    base = base_model or (src if isinstance(src, str) and not Path(src).exists() and src.count("/") == 1 else None)
    return render_model_card(base_model=base, repo_id=repo_id, manifest=manifest, verify_summary=verify_summary, serve_hint="")
