"""The command line: ``nvfp4-fuse convert | verify | push | sample``.

Exit codes: 0 success, 1 internal error, 2 bad input (one clear line naming file and tensor),
3 a verification check failed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, InputError, Nvfp4FuseError
from .layout import W13Order
from .targets import DEFAULT_TARGET, TargetName

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="ModelOpt NVFP4 per-expert MoE checkpoints -> fused-expert layouts.")
err = Console(stderr=True)
out = Console()


def _resolve(source: str, revision: str | None) -> tuple[Path, Path | None]:
    """Local folder, or a Hub repo id resolved through the cache. Returns (folder, trust root)."""
    p = Path(source)
    if p.exists():
        if revision:
            raise InputError("--revision applies to Hub repo ids, not to local folders")
        return p, None
    from . import hub

    folder = hub.resolve_source(source, revision=revision)
    # Hub cache snapshots are symlinks into the repo's blobs/ folder: trust the repo folder.
    trust = folder.parents[1] if folder.parent.name == "snapshots" else None
    return folder, trust


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and os.environ.get("NVFP4_FUSE_PROGRESS") != "1",
    )


def _print_plan(plan: Any, out_dir: Path, workers: int, streams: int, as_json: bool) -> None:
    from .spec import human

    d = plan.summary(workers, out_dir, streams)
    if as_json:
        out.print_json(json.dumps(d))
        return
    t = Table(title=f"nvfp4-fuse plan: target {d['target']}", show_lines=False)
    for c in ("expert module", "experts", "hidden", "intermediate", "gate/up scale_2 differ", "input-scale max/min (w13 / w2)"):
        t.add_column(c, justify="right" if c != "expert module" else "left", no_wrap=c == "expert module")
    for m in d["modules"]:
        known = "input_scale_spread" in m
        t.add_row(
            m["prefix"],
            str(m["experts"]),
            str(m["hidden"]),
            str(m["intermediate"]),
            (f"{m['scale_2_mismatches']}" + (" (rescaled)" if m["rescaled_experts"] else "")) if known else "n/a",
            f"{m['input_scale_spread']:.3g} / {m['w2_input_scale_spread']:.3g}" if known else "n/a",
        )
    out.print(t)
    for p, g in d["copied_expert_modules"].items():
        out.print(f"{p}: {g['experts']} experts, {g['format']}, copied (left per expert, byte for byte)")
    for enc, n in d["decoded_block_scales"].items():
        out.print(f"block scales: {n} stored compressed ({enc}), decoded exactly and written as plain E4M3")
    s = Table(title="output shards")
    s.add_column("file")
    s.add_column("tensors", justify="right")
    s.add_column("bytes", justify="right")
    for sh in d["shards"]:
        s.add_row(sh["name"], str(sh["tensors"]), human(sh["bytes"]))
    out.print(s)
    src = d["source"]
    out.print(f"source: {src['path']} ({src['shards']} shards, {src['tensors']} tensors, {src['other_files']} other files)")
    for m in d["modules"]:
        if m.get("input_scale_spread", 1) > 256:
            out.print(
                f"[yellow]warning:[/yellow] {m['prefix']}: input scales span {m['input_scale_spread']:.0f}x; "
                "merging them by max costs precision above ~256x"
            )
    _print_repairs({m["prefix"]: m.get("repaired_input_scales") or {} for m in d["modules"]})
    out.print(f"target: {d['target']}: {d['description']}")
    out.print(f"disk needed: {human(d['disk_needed'])}; free at {out_dir}: {human(d['disk_free'])}")
    out.print(f"peak memory (estimate, {streams} shard(s) written at once): {human(d['peak_memory_estimate'])}")


def _print_repairs(repaired: dict[str, dict[str, int]]) -> None:
    """One line per layer whose missing or zero input scales were repaired, then the rule."""
    from .experts import INPUT_SCALE_RULE

    if not any(repaired.values()):
        return
    for prefix, by_role in repaired.items():
        if by_role:
            out.print(f"{prefix}: input scales repaired: " + ", ".join(f"{role} {n}" for role, n in by_role.items()))
    out.print(f"  ({INPUT_SCALE_RULE})")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Source checkpoint: a local folder or a Hub repo id (org/name)."),
    output: Path = typer.Argument(..., help="Output folder (created)."),
    target: TargetName = typer.Option(DEFAULT_TARGET, help="Output layout: mega-moe (DeepGEMM MegaMoE), vllm-fused (128x4 swizzle), linear, per-expert (one Linear per expert, repaired for stock engines)."),
    w13_order: W13Order = typer.Option(W13Order.GATE_UP, help="Row order of w13 for vllm-fused/linear."),
    max_shard_size: str = typer.Option("5GB", help="Largest output shard (a tensor is never split)."),
    workers: int = typer.Option(4, help="Reader threads (they mostly wait on the disk, so more than the cores is fine)."),
    shard_streams: int = typer.Option(
        0, help="Output shards written (and hashed) at once, each by its own threads; 0 picks by the CPU count (1 per 2 cores, 2 to 8)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier conversion held in the output folder (never a folder nvfp4-fuse did not write)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (from headers only) and exit."),
    revision: str | None = typer.Option(None, help="Hub revision, for a repo id."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Convert a per-expert ModelOpt NVFP4 MoE checkpoint into a fused-expert layout."""
    from .convert import ConvertOptions, make_plan
    from .convert import convert as run_convert
    from .spec import build_spec, human, parse_size

    opts = ConvertOptions(target, w13_order, parse_size(max_shard_size), workers, overwrite, shard_streams)
    streams = opts.streams()
    if dry_run and not Path(source).exists() and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        from . import hub
        from .source import source_from_headers

        remote = hub.remote_safetensors_headers(source, revision=revision)
        src = source_from_headers(source, remote.headers, sharded=remote.sharded)
        plan = build_spec(src, opts.output_options(), with_scalars=False)
        _print_plan(plan, output, workers, streams, json_out)
        if not json_out:
            out.print("(planned from the Hub's shard headers alone: scalar scales not read, sidecar sizes not counted)")
        return
    folder, trust = _resolve(source, revision)
    plan = make_plan(folder, opts, trust_root=trust)
    if dry_run:
        _print_plan(plan, output, workers, streams, json_out)
        return
    with _progress() as prog:
        task = prog.add_task("convert", total=plan.total_size)
        res = run_convert(folder, output, opts, spec=plan, source_label=source, on_bytes=lambda n: prog.advance(task, n))
    if json_out:
        out.print_json(
            json.dumps(
                {
                    "output": str(res.out_dir),
                    "target": plan.target.name,
                    "already_complete": res.already_complete,
                    "resumed_shards": res.resumed_shards,
                    "seconds": res.seconds,
                    "layers": [r.to_json() for r in res.layers],
                    "copied_expert_modules": {p: {"format": g.format, "experts": g.experts} for p, g in plan.copied_groups.items()},
                    "files": res.files,
                }
            )
        )
        return
    if res.already_complete:
        out.print(f"[green]{output} already holds this conversion (manifest matches); nothing to do.")
        return
    t = Table(title=f"converted to {plan.target.name} in {res.seconds:.1f} s")
    for c in ("expert module", "experts", "rescaled", "max rescale change", "input-scale max/min (w13 / w2)"):
        t.add_column(c, justify="left" if c == "expert module" else "right", no_wrap=c == "expert module")
    for r in res.layers:
        t.add_row(
            r.prefix, str(r.experts), str(r.rescaled_experts), f"{100 * r.max_rescale_change:.2f}%",
            f"{r.input_scale_spread:.3g} / {r.w2_input_scale_spread:.3g}",
        )  # fmt: skip
    out.print(t)
    for g in plan.copied_groups.values():
        out.print(f"{g.prefix}: {g.experts} experts, {g.format}, copied")
    _print_repairs({r.prefix: r.repaired_input_scales for r in res.layers})
    if res.resumed_shards:
        out.print(f"resumed: kept {len(res.resumed_shards)} complete shard(s) from an earlier run")
    out.print(f"wrote {len(plan.shards)} shard(s), {human(plan.total_size)} of tensors, to {output}")


@app.command()
def verify(
    source: str = typer.Argument(..., help="The source checkpoint: a local folder or a Hub repo id."),
    converted: Path = typer.Argument(..., help="The converted folder."),
    sample_n: int | None = typer.Option(None, "--sample", help="Check N random experts a layer (default: all)."),
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    decode: bool | None = typer.Option(
        None, "--decode/--no-decode", help="Dequantize and compare every checked expert end to end (default: on a GPU only)."
    ),
    skip_hashes: bool = typer.Option(False, "--skip-hashes", help="Compare file sizes with the manifest but do not hash."),
    revision: str | None = typer.Option(None, help="Hub revision, for a repo id."),
    seed: int | None = typer.Option(None, help="Seed for --sample."),
    workers: int = typer.Option(
        0, help="Worker threads; 0: up to 8 on the CPU, 6 with the GPU decode (its per-expert host work holds the GIL)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Prove the converted checkpoint decodes to what the source did (exit 3 when a check fails)."""
    from .errors import CheckFailed
    from .verify import verify as run_verify

    if sample_n is not None and sample_n < 1:
        raise InputError("--sample must be at least 1")
    folder, trust = _resolve(source, revision)
    try:
        res = run_verify(
            folder,
            converted,
            sample=sample_n,
            device=device,
            decode=decode,
            hash_files=not skip_hashes,
            workers=max(0, workers),
            trust_root=trust,
            source_label=source,
            seed=seed,
        )
    except CheckFailed as e:
        if json_out:
            out.print_json(json.dumps({"ok": False, "error": str(e)}))
        raise
    _write_verify_summary(converted, res.to_json())
    if json_out:
        out.print_json(json.dumps(res.to_json()))
        return
    t = Table(title=f"verify: {converted} ({res.target}) against {source}")
    for c in ("expert module", "experts checked", "rescaled", "max rel error", "decoded", "max abs error"):
        t.add_column(c, justify="left" if c == "expert module" else "right", no_wrap=c == "expert module")
    for r in res.layers:
        t.add_row(
            r.prefix, f"{r.checked}/{r.experts}", str(r.rescaled), f"{100 * r.max_rel:.3f}%",
            str(r.decoded), f"{r.max_abs:.3g}" if r.max_abs is not None else "-",
        )  # fmt: skip
    out.print(t)
    for g in res.copied_groups:
        out.print(f"{g['prefix']}: {g['experts']} experts, {g['format']}, copied: every byte identical to the source")
    out.print("checks that ran:")
    for c in res.checks:
        out.print(f"  - {c}")
    if res.note:
        out.print(f"note: {res.note}")
    out.print(f"[green]OK[/green]: {res.files_hashed} files hashed, {res.copied_tensors} copied tensors byte-identical ({res.device}, {res.seconds:.1f} s)")


@app.command()
def push(
    converted: Path = typer.Argument(..., help="A complete converted folder."),
    repo_id: str = typer.Argument(..., help="Hub repo id to create or update (org/name)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: str | None = typer.Option(None, help="Branch to push to (created if missing)."),
    commit_message: str | None = typer.Option(None, help="Commit message."),
    base_model: str | None = typer.Option(None, help="base_model for the model card (default: the source recorded by convert, if a repo id)."),
    no_card: bool = typer.Option(False, "--no-card", help="Do not write a model card (README.md)."),
    force: bool = typer.Option(False, "--force", help="Push even if the folder is not a complete, matching conversion."),
) -> None:
    """Upload a converted folder to the Hugging Face Hub, with a model card, then check the Hub's hashes."""
    from . import hub
    from .manifest import load_manifest

    man = load_manifest(converted)
    card = None
    if not no_card and man is not None:
        src = man.source.get("source") if isinstance(man.source, dict) else None
        base = base_model or (src if isinstance(src, str) and not Path(src).exists() and src.count("/") == 1 else None)
        verify_summary = _read_verify_summary(converted)
        card = hub.render_model_card(base_model=base, repo_id=repo_id, manifest=man.to_json(), verify_summary=verify_summary, serve_hint="")
    res = hub.push(converted, repo_id, private=private, revision=revision, commit_message=commit_message, force=force, card=card)
    out.print(f"[green]pushed[/green] {len(res.checked)} files to {res.repo_url} (commit {res.commit_oid}); Hub hashes match the local files")


VERIFY_SUMMARY_NAME = "nvfp4-fuse-verify.json"


def _manifest_digest(folder: Path) -> str | None:
    from .manifest import MANIFEST_NAME, sha256_file

    p = Path(folder) / MANIFEST_NAME
    return sha256_file(p) if p.is_file() else None


def _write_verify_summary(folder: Path, summary: dict) -> None:
    """Record a passed verify next to the manifest it checked (the model card quotes it)."""
    from .safetensors_io import write_file_atomic

    body = dict(summary, manifest_sha256=_manifest_digest(folder))
    write_file_atomic(Path(folder) / VERIFY_SUMMARY_NAME, (json.dumps(body, indent=1) + "\n").encode())


def _read_verify_summary(folder: Path) -> dict | None:
    """The last passed verify's summary, if it was of this very manifest."""
    p = Path(folder) / VERIFY_SUMMARY_NAME
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict) or d.get("manifest_sha256") != _manifest_digest(folder):
        return None
    d.pop("manifest_sha256", None)
    return d


@app.command()
def sample(
    output: Path = typer.Argument(..., help="Folder to write the sample checkpoint into."),
    arch: str = typer.Option("modelopt", help="modelopt (names from --scheme) or deepseek-v4 (a recipe's real format, --recipe)."),
    recipe: str = typer.Option("nvidia", help="deepseek-v4: nvidia (ModelOpt's recipe) or canada (canada-quant's)."),
    scheme: str = typer.Option("deepseek", help="modelopt: tensor names: deepseek, hf, mixtral, compressed-tensors."),
    layers: int | None = typer.Option(None, help="Layers (modelopt: 3, layer 0 dense; deepseek-v4: 4, the first 3 hash-routed)."),
    experts: int = typer.Option(8, help="Routed experts per MoE layer."),
    hidden: int | None = typer.Option(None, help="Hidden size H (modelopt: 256, deepseek-v4: 512)."),
    intermediate: int | None = typer.Option(None, help="Expert intermediate size I (modelopt: 128, deepseek-v4: 512)."),
    shards: int = typer.Option(3, help="Number of shards."),
    values: str = typer.Option("U8", help="deepseek-v4: dtype of the NVFP4 experts' packed values, U8 or I8."),
    unequal_scale_2: bool = typer.Option(False, "--unequal-scale-2", help="modelopt: give gate and up different weight_scale_2."),
    scale_encoding: str | None = typer.Option(
        None, help="modelopt: store every block scale compressed, csf or csf_32x2_v1 (weight_scale_encoding, as vLLM 0.34 reads it)."
    ),
    seed: int | None = typer.Option(None, help="Random seed (default: random)."),
) -> None:
    """Write a small real-format NVFP4 MoE checkpoint (random weights, real quantization)."""
    if arch == "deepseek-v4" and scale_encoding is not None:
        raise InputError("--scale-encoding is for --arch modelopt")
    if arch == "deepseek-v4":
        from .sample_dsv4 import DSv4SampleSpec, make_dsv4_sample

        spec4 = DSv4SampleSpec(recipe, layers or 4, min(3, layers or 4), experts, hidden or 512, intermediate or 512, shards, values, seed=seed)
        try:
            make_dsv4_sample(output, spec4)
        except ValueError as e:
            raise InputError(str(e)) from None
        out.print(f"sample DeepSeek-V4 checkpoint ({recipe} recipe, {spec4.layers} layers + MTP, {experts} experts) written to {output}")
        return
    if arch != "modelopt":
        raise InputError(f"--arch must be modelopt or deepseek-v4, not {arch!r}")
    from .sample import SampleSpec, make_sample_checkpoint

    spec = SampleSpec(
        scheme, layers or 3, experts, hidden or 256, intermediate or 128, shards, unequal_scale_2, seed=seed, scale_encoding=scale_encoding
    )
    try:
        make_sample_checkpoint(output, spec)
    except ValueError as e:
        raise InputError(str(e)) from None
    out.print(f"sample checkpoint ({scheme} names, {spec.layers} layers, {experts} experts) written to {output}")


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except Nvfp4FuseError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # usage errors come through here too (typer's own click, in standalone_mode=False)
        if isinstance(e, typer.Abort):
            sys.exit(130)
        if isinstance(e, typer.TyperException) and hasattr(e, "show"):  # a usage error: bad option, missing argument
            e.show()
            sys.exit(EXIT_BAD_INPUT)
        err.print_exception()
        err.print(f"[red]internal error:[/red] {type(e).__name__}: {e}")
        sys.exit(EXIT_INTERNAL)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()

__all__ = ["app", "main", "__version__"]
