"""The command line: ``nvfp4-fuse convert | verify | push | inspect | sample``.

Exit codes (README, "Exit codes"): 0 success, 1 internal error (a bug: the traceback is printed),
2 bad input, a bad option or an OS error (one line naming the file or path), 3 a check failed,
4 the Hub kept failing with transient errors, 5 ``inspect``: some engine loses accuracy or fails on
the checkpoint, 130 interrupted.

``--json`` prints one object on stdout, success or failure, in the schema ``nvfp4-fuse/1``
(:mod:`nvfp4_fuse.json_out`).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from . import __version__, mapped_faults
from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, InputError, Nvfp4FuseError
from .json_out import emit, envelope, error_body
from .layout import W13Order
from .progress import byte_progress, download_line, progress_enabled
from .targets import DEFAULT_TARGET, TARGET_NAMES, TargetName

err = Console(stderr=True)
out = Console(soft_wrap=True)  # prose and paths are not broken; tables still fit the width


def _no_bool_metavar(opt: Any) -> Any:
    if opt is not None:
        opt.metavar = ""
    return opt


class _Command(TyperCommand):
    """Usage as ``SOURCE OUTPUT`` (git's and pip's style), and ``-h`` without a type."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        rv = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = p.metavar or p.name.upper()
                rv.append(name if p.required else f"[{name}]")
            else:
                rv.extend(p.get_usage_pieces(ctx))
        return rv

    def get_help_option(self, ctx: Any) -> Any:
        return _no_bool_metavar(super().get_help_option(ctx))


class _Group(TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _no_bool_metavar(super().get_help_option(ctx))


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="ModelOpt NVFP4 per-expert MoE checkpoints -> fused-expert layouts.",
)


def _version(value: bool) -> None:
    if value:
        out.print(f"nvfp4-fuse {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True, metavar="", help="Show the version and exit."),
) -> None:
    """ModelOpt NVFP4 per-expert MoE checkpoints -> fused-expert layouts."""


def flag(default: bool, decls: str, help: str) -> Any:  # noqa: A002
    """A boolean flag (``--x/--no-x``), shown without a type."""
    return typer.Option(default, decls, help=help, metavar="", show_default=False)


JSON_HELP = "Print one JSON object on stdout (schema nvfp4-fuse/1, see README), errors included; no progress."
QUIET_HELP = "No progress display."
MAX_DISK_HELP = (
    "For a Hub repo id: the most disk the run holds besides its finished output shards (source files "
    "downloaded and not yet done with, output shards being written), with a unit: 40GB. Default: twice "
    "the minimum (the source files one output shard reads plus that shard; less is refused), or the free "
    "disk beside the output if less. With --push-to an output shard counts until it is uploaded, and from "
    "a local folder the budget bounds the output shards not yet uploaded (default: one per shard stream "
    "and per upload)."
)


VERIFY_MAX_DISK_HELP = (
    "For a Hub repo id: the most disk the source files fetched and not yet done with may take, with a "
    "unit: 40GB. Default: twice the minimum (the source files the checks of one output shard read; less "
    "is refused), or the free disk of the work folder if less."
)
WORK_DIR_HELP = (
    "For a Hub repo id: where the temporary folder for the source files is made (and removed at the end). "
    "Default: beside CONVERTED, or the system's temporary folder ($TMPDIR) if that cannot be written."
)


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


def _layer_key(prefix: str) -> tuple:
    """Sort key: layer order (layers.2 before layers.10), the MTP layer after the numbered ones."""
    import re

    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", prefix) if t)


RESCALE_NOTE = (
    "rescale error: largest relative change of a dequantized value from merging gate/up weight_scale_2; "
    "each block scale is held within half an E4M3 step of exact (at most 6.25% for normal scales)"
)


OUTPUT_STATE = {
    "fresh": "output: {output} will be created",
    "replace": "output: the earlier conversion in {output} will be replaced (--overwrite)",
    "ours": "output: {output} holds this conversion, complete or part done: the run keeps what is complete",
}
SPREAD_NOTE = "input spread: max/min of the experts' input scales, w13 / w2"


def _warnings(plan: Any, *, remote: bool = False) -> list[str]:
    """What the user should know before serving the output (``remote``: a plan from the Hub's shard
    headers alone, which reads no config)."""
    w = []
    if not remote and "config.json" not in plan.source.configs:
        w.append(
            f"{plan.source.root} has no config.json: the output has none either, so no loader knows its "
            "architecture or its fused layout (the manifest still records it); add the model's config.json to serve it"
        )
    for layer in plan.layers.values():
        if layer.scalars and layer.input_scale_spread > 256:
            w.append(
                f"{layer.prefix}: input scales span {layer.input_scale_spread:.0f}x; merging them by max costs precision above ~256x"
            )
    return w


def _plan_body(plan: Any, out_dir: Path, workers: int, streams: int, *, remote: bool = False) -> dict:
    from .writable import writable_problem

    d = plan.summary(workers, out_dir, streams)
    d["modules"] = sorted(d["modules"], key=lambda m: _layer_key(m["prefix"]))
    d["output"] = str(out_dir)
    d["output_writable"] = writable_problem(out_dir) is None
    d["warnings"] = _warnings(plan, remote=remote)
    return d


def _print_plan(d: dict, out_dir: Path) -> None:
    from .spec import human

    t = Table(title=f"plan: target {d['target']}")
    for c in ("expert module", "experts", "hidden", "inter", "s2 differ", "input spread"):
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
    out.print(SPREAD_NOTE + "; s2 differ: experts whose gate and up weight_scale_2 differ", highlight=False)
    for p, g in sorted(d["copied_expert_modules"].items(), key=lambda kv: _layer_key(kv[0])):
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
    _print_repairs({m["prefix"]: m.get("repaired_input_scales") or {} for m in d["modules"]})
    out.print(f"target: {d['target']}: {d['description']}")
    out.print(f"disk needed: {human(d['disk_needed'])}; free at {out_dir}: {human(d['disk_free'])}")
    out.print(f"peak memory (estimate, {d['shard_streams']} shard(s) written at once): {human(d['peak_memory_estimate'])}")
    if "push" in d:
        pp = d["push"]
        out.print(
            f"push to {pp['repo_id']}@{pp['revision']}: {pp['uploads']} shard upload(s), {human(pp['upload_bytes'])}, each as soon as it is "
            f"written and checked, then freed; {pp['commits']} commit of {pp['files_in_commit']} files at the end (nothing visible before it); "
            f"output shards on disk at once: at most {human(pp['disk_budget'])}",
            highlight=False,
        )


def _plan_push(d: dict, plan: Any, push_to: str | None, streams: int, max_disk: int | None = None, branch: str | None = None) -> None:
    """Add what --push-to will do to a dry run's plan."""
    if push_to:
        from .hub.stream_upload import push_plan

        d["push"] = push_plan(plan, push_to, streams=streams, max_disk=max_disk, revision=branch)


def _print_repairs(repaired: dict[str, dict[str, int]]) -> None:
    """One line per layer whose missing or zero input scales were repaired, then the rule."""
    from .experts import INPUT_SCALE_RULE

    if not any(repaired.values()):
        return
    for prefix, by_role in repaired.items():
        if by_role:
            out.print(f"{prefix}: input scales repaired: " + ", ".join(f"{role} {n}" for role, n in by_role.items()))
    out.print(f"  ({INPUT_SCALE_RULE})")


def _warn(lines: list[str]) -> None:
    for w in lines:
        err.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False, soft_wrap=True)


@app.command(cls=_Command)
def convert(
    source: str = typer.Argument(..., metavar="SOURCE", help="Source checkpoint: a local folder or a Hub repo id (org/name).", show_default=False),
    output: Path = typer.Argument(..., metavar="OUTPUT", help="Output folder (created).", show_default=False),
    target: TargetName = typer.Option(
        DEFAULT_TARGET, "--target", metavar="TARGET", help=f"Output layout: {', '.join(TARGET_NAMES)} (see README, Targets)."
    ),
    w13_order: W13Order = typer.Option(W13Order.GATE_UP, metavar="ORDER", help="Row order of w13 for vllm-fused/linear: gate-up or up-gate."),
    max_shard_size: str = typer.Option("5GB", metavar="SIZE", help="Largest output shard, with a unit: 5GB, 500MB, 2GiB (a tensor is never split)."),
    workers: int = typer.Option(4, metavar="N", help="Reader threads (they mostly wait on the disk, so more than the cores is fine)."),
    shard_streams: int = typer.Option(
        0, metavar="N", help="Output shards written (and hashed) at once; 0 picks by the CPU count (1 per 2 cores, 2 to 8)."
    ),
    overwrite: bool = flag(False, "--overwrite/--no-overwrite", "Replace an earlier conversion of other input or options held in OUTPUT (never a folder nvfp4-fuse did not write)."),
    dry_run: bool = flag(False, "--dry-run", "Print the plan (from headers only) and exit; writes nothing."),
    revision: str | None = typer.Option(None, metavar="REV", help="Hub revision (branch, tag or commit), for a repo id."),
    push_to: str | None = typer.Option(
        None, metavar="REPO_ID", help="Upload each shard as it is written and checked, free it, and commit the model to this Hub repo at the end (OUTPUT is then a work folder)."
    ),
    push_branch: str | None = typer.Option(
        None, metavar="BRANCH", help="With --push-to: commit the model to this branch (created from main if missing) instead of main."
    ),
    private: bool = flag(False, "--private/--public", "With --push-to: create the repo private (an existing repo keeps its visibility)."),
    token: str | None = typer.Option(None, "--token", metavar="TOKEN", help="With --push-to: Hub token (default: HF_TOKEN or the saved login)."),
    max_disk: str | None = typer.Option(None, "--max-disk", metavar="SIZE", help=MAX_DISK_HELP, show_default=False),
    json_out: bool = flag(False, "--json", JSON_HELP),
    quiet: bool = flag(False, "--quiet", QUIET_HELP),
) -> None:
    """Convert a per-expert ModelOpt NVFP4 MoE checkpoint into a fused-expert layout."""
    from .convert import ConvertOptions, make_plan
    from .convert import convert as run_convert
    from .spec import build_spec, human, parse_shard_size
    from .writable import require_writable

    opts = ConvertOptions(target, w13_order, parse_shard_size(max_shard_size), workers, overwrite, shard_streams)
    streams = opts.streams()
    show = progress_enabled(err, quiet or json_out)
    hub_files = None  # a repo id: fetched as the output needs it (hub/stream.py)
    if push_branch is not None and not push_to:
        raise InputError("--push-branch applies with --push-to")
    # with --push-to each shard is checked as written, with the end-to-end decode where a GPU is there
    from .written_check import gpu_decode

    check_decode = gpu_decode() if push_to and not dry_run else None
    hp = (
        _plan_from_hub(source, output, opts, revision, max_disk, dry_run, json_out, show, push_to, push_branch, check_decode)
        if _streams_from_hub(source)
        else _LOCAL
    )
    if hp is None:
        return  # a dry run, printed
    if hp is not _LOCAL:
        hub_files = hp.files
    elif max_disk is not None and not push_to and not _streams_from_hub(source):
        raise InputError("--max-disk applies to a Hub repo id as source, or with --push-to (a local source is read in place)")
    if dry_run and hub_files is None and not Path(source).exists() and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        from . import hub
        from .source import source_from_headers

        with err.status(f"reading {source}'s shard headers from the Hub", spinner="dots") if show else _null():
            remote = hub.remote_safetensors_headers(source, revision=revision)
            src = source_from_headers(source, remote.headers, sharded=remote.sharded)
            plan = build_spec(src, opts.output_options(), with_scalars=False)
        d = _plan_body(plan, output, workers, streams, remote=True)
        d["note"] = "planned from the Hub's shard headers alone: scalar scales not read, sidecar sizes not counted"
        _plan_push(d, plan, push_to, streams, branch=push_branch)
        require_writable(output, "output folder")
        if json_out:
            emit("convert", d)
            return
        _print_plan(d, output)
        _warn(d["warnings"])
        out.print(f"({d['note']})")
        return
    if not dry_run:
        require_writable(output, "output folder")  # before minutes of planning, not after
    if hub_files is not None:
        folder, plan = Path(source), hp.spec
    else:
        folder, trust = _resolve(source, revision)
        with err.status(f"planning: reading {folder}'s headers and scales", spinner="dots") if show else _null():
            plan = make_plan(folder, opts, trust_root=trust)
    if dry_run:
        from .convert import check_output

        d = _plan_body(plan, output, workers, streams)
        _plan_push(d, plan, push_to, streams, branch=push_branch)
        require_writable(output, "output folder")  # what the real run would meet first,
        d["output_state"] = check_output(output, plan, opts)  # then what it finds there (refusals raise)
        if json_out:
            emit("convert", d)
            return
        _print_plan(d, output)
        out.print(OUTPUT_STATE[d["output_state"]].format(output=output), highlight=False)
        _warn(d["warnings"])
        return
    if not json_out:
        _warn(_warnings(plan))

    def resumed(kept: list[str]) -> None:
        if not quiet:
            err.print(f"resumed: kept {len(kept)} complete shard(s) from an earlier run; writing the other {len(plan.shards) - len(kept)}", highlight=False)

    with byte_progress(err, show) as prog:
        task = prog.add_task("convert", total=plan.total_size, kept=0)
        sink = _push_sink(
            output, push_to, push_branch, token, private, prog, plan, max_disk if hub_files is None else None, hub_files, check_decode
        )
        prog.refresh()  # drawn at once, however short the run

        def on_resume(kept: list[str]) -> None:
            resumed(kept)
            prog.update(task, kept=sum(s.data_bytes for s in plan.shards if s.name in kept))

        with sink or _null(), download_line(prog, None if hub_files is None else lambda: hub_files):
            res = run_convert(
                folder, output, opts, spec=plan, source_label=source, on_bytes=lambda n: prog.advance(task, n), on_resume=on_resume,
                files=hub_files, sink=sink,
            )  # fmt: skip
    reports = sorted(res.layers, key=lambda r: _layer_key(r.prefix))
    if json_out:
        emit(
            "convert",
            {
                "output": str(res.out_dir),
                "target": plan.target.name,
                "already_complete": res.already_complete,
                "resumed_shards": res.resumed_shards,
                "seconds": res.seconds,
                "modules": [
                    {
                        "prefix": r.prefix,
                        "experts": r.experts,
                        "hidden": r.hidden,
                        "intermediate": r.inter,
                        "rescaled_experts": r.rescaled_experts,
                        "max_rescale_error": r.max_rescale_change,
                        "input_scale_spread": r.input_scale_spread,
                        "w2_input_scale_spread": r.w2_input_scale_spread,
                        "repaired_input_scales": r.repaired_input_scales,
                    }
                    for r in reports
                ],
                "copied_expert_modules": {p: {"format": g.format, "experts": g.experts} for p, g in plan.copied_groups.items()},
                "files": res.files,
                "warnings": _warnings(plan),
                **({"push": dict(sink.outcome.__dict__)} if sink else {}),
            },
        )
        return
    if res.already_complete and sink:
        out.print(f"{push_to}@{sink.outcome.revision} already holds this conversion (Hub hashes match the manifest); nothing to do.", highlight=False)
        return
    if res.already_complete:
        out.print(f"{output} already holds this conversion (manifest matches); nothing to do.", highlight=False)
        return
    t = Table(title=f"converted to {plan.target.name} in {res.seconds:.1f} s")
    cols = ["expert module", "experts", "rescaled", "rescale error", "input spread"]
    for c in cols:
        t.add_column(c, justify="left" if c == "expert module" else "right", no_wrap=c == "expert module")
    for r in reports:
        t.add_row(
            r.prefix, str(r.experts), str(r.rescaled_experts), f"{100 * r.max_rescale_change:.2f}%",
            f"{r.input_scale_spread:.3g} / {r.w2_input_scale_spread:.3g}",
        )  # fmt: skip
    out.print(t)
    out.print(SPREAD_NOTE, highlight=False)
    if any(r.rescaled_experts for r in reports):
        out.print(RESCALE_NOTE, highlight=False)
    for g in sorted(plan.copied_groups.values(), key=lambda g: _layer_key(g.prefix)):
        out.print(f"{g.prefix}: {g.experts} experts, {g.format}, copied")
    _print_repairs({r.prefix: r.repaired_input_scales for r in reports})
    if res.resumed_shards:
        out.print(f"resumed: kept {len(res.resumed_shards)} complete shard(s) from an earlier run")
    if sink:
        o = sink.outcome
        reused = f" ({len(o.reused)} uploaded by an earlier run)" if o.reused else ""
        out.print(
            f"[green]pushed[/green] {len(plan.shards)} shard(s), {human(plan.total_size)} of tensors{reused}, and {len(o.checked) - len(plan.shards)} "
            f"small files to {push_to}@{o.revision} in one commit ({o.commit}); Hub hashes match the manifest; {output} keeps only the manifest "
            f"and the push journal",
            highlight=False,
        )
        return
    out.print(f"wrote {len(plan.shards)} shard(s), {human(plan.total_size)} of tensors, to {output}", highlight=False)


def _push_sink(
    output: Path, push_to: str | None, branch: str | None, token: str | None, private: bool, prog: Any, plan: Any, max_disk: str | None,
    files: Any, decode: str | None,
) -> Any:
    """The Hub side of --push-to (None without it), with its own line in the progress display: each
    shard checked against its source (read through ``files``, a Hub source, when given), uploaded and
    freed; ``max_disk`` bounds the output shards not yet uploaded (a local source: a Hub source's
    budget counts them already); ``decode`` is the end-to-end decode each check runs (None: not run)."""
    if not push_to:
        return None
    from huggingface_hub.utils import disable_progress_bars

    from .hub.stream_upload import HubSink, set_stall_timeout
    from .spec import parse_size

    disable_progress_bars()  # the upload has its own line in ours (and --json prints one object alone)
    set_stall_timeout()
    up = prog.add_task("upload", total=plan.total_size, kept=0)
    from .written_check import shard_check

    limit = parse_size(max_disk) if max_disk is not None else None
    check = shard_check(plan, files, decode=decode)
    return HubSink(
        output, push_to, revision=branch, token=token, private=private, max_disk=limit, check=check, on_uploaded=lambda n: prog.advance(up, n),
        source_remote=files is not None, check_decodes=decode is not None,
    )  # fmt: skip


def _streams_from_hub(source: str) -> bool:
    """A repo id (not an existing path) while the Hub may be used: fetched as needed, within --max-disk.
    Offline (HF_HUB_OFFLINE), a repo id is read from the cached snapshot, as a folder."""
    from huggingface_hub import constants

    from .hub.download import REPO_ID_RE, _looks_like_path

    return not Path(source).exists() and not _looks_like_path(source) and bool(REPO_ID_RE.match(source)) and not constants.HF_HUB_OFFLINE


_LOCAL = object()  # the source is read as a folder (a local one, or a cached snapshot)


def _plan_from_hub(
    source: str, output: Path, opts: Any, revision: str | None, max_disk: str | None, dry_run: bool, json_out: bool, show: bool,
    push_to: str | None = None, push_branch: str | None = None, check_decode: str | None = None,
) -> Any:
    """The plan of converting a repo id as it streams (hub/stream.py); for a dry run, print it and
    the disk and requests it takes, and return None. When the Hub cannot be reached at all, returns
    ``_LOCAL``: the cached snapshot, if complete, is converted as a folder (as without this mode)."""
    import functools

    from .disk_budget import convert_steps
    from .hub.fetch import HubUnreachable
    from .hub.stream import disk_summary, hub_plan, print_disk_summary
    from .spec import parse_size
    from .writable import require_writable

    if opts.workers < 1:
        raise InputError("--workers must be at least 1")
    limit = parse_size(max_disk) if max_disk is not None else None  # a size <= 0 is refused there
    require_writable(output, "output folder")  # before minutes of planning, not after
    try:
        with err.status(f"planning: reading {source}'s headers and scales from the Hub", spinner="dots") if show else _null():
            hp = hub_plan(
                source, output, opts.output_options(), revision=revision, max_disk=limit, overwrite=opts.overwrite,
                with_scalars=not dry_run, steps=functools.partial(convert_steps, decode=check_decode is not None),
            )  # fmt: skip
    except HubUnreachable:
        return _LOCAL
    if not dry_run:
        return hp
    from .convert import check_output

    d = _plan_body(hp.spec, output, opts.workers, opts.streams(), remote=True)
    d["output_state"] = check_output(output, hp.spec, opts)
    d["disk"] = disk_summary(hp)
    _plan_push(d, hp.spec, push_to, opts.streams(), hp.files.reserve_bytes, branch=push_branch)
    d["note"] = "planned from the Hub's shard headers and configs: scalar scales not read"
    if json_out:
        emit("convert", d)
        return None
    _print_plan(d, output)
    print_disk_summary(d["disk"], lambda line: out.print(line, highlight=False))
    out.print(OUTPUT_STATE[d["output_state"]].format(output=output), highlight=False)
    _warn(d["warnings"])
    out.print(f"({d['note']})")
    return None


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


@app.command(cls=_Command)
def verify(
    source: str = typer.Argument(..., metavar="SOURCE", help="The source checkpoint: a local folder or a Hub repo id.", show_default=False),
    converted: Path = typer.Argument(..., metavar="CONVERTED", help="The converted folder (only read).", show_default=False),
    sample_n: int | None = typer.Option(None, "--sample", metavar="N", help="Check N random experts a layer (default: all)."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cuda or cpu."),
    decode: bool | None = typer.Option(
        None, "--decode/--no-decode", metavar="", show_default=False, help="Dequantize and compare every checked expert end to end (default: on a GPU only)."
    ),
    skip_hashes: bool = flag(False, "--skip-hashes", "Compare file sizes with the manifest but do not hash."),
    revision: str | None = typer.Option(None, metavar="REV", help="Hub revision, for a repo id."),
    seed: int | None = typer.Option(None, metavar="N", help="Seed for --sample."),
    workers: int = typer.Option(
        0, metavar="N", help="Worker threads; 0: up to 8 (the GPU decode runs on threads of its own)."
    ),
    report: Path | None = typer.Option(None, metavar="PATH", help="Also write the result as JSON to PATH (never into CONVERTED unless asked)."),
    max_disk: str | None = typer.Option(None, "--max-disk", metavar="SIZE", help=VERIFY_MAX_DISK_HELP, show_default=False),
    work_dir: Path | None = typer.Option(None, "--work-dir", metavar="DIR", help=WORK_DIR_HELP, show_default=False),
    dry_run: bool = flag(False, "--dry-run", "For a Hub repo id: print the downloads and the disk they take (from headers only) and exit."),
    json_out: bool = flag(False, "--json", JSON_HELP),
    quiet: bool = flag(False, "--quiet", QUIET_HELP),
) -> None:
    """Prove the converted checkpoint decodes to what the source did (exit 3 when a check fails).

    Reads both folders and writes nothing into them: the result goes to stdout, to --report PATH
    if given, and to the user's cache (so that `push` can quote it in the model card). From a Hub
    repo id the source is fetched as the checks need it, into a temporary folder removed at the end."""
    from .verify import verify as run_verify
    from .verify_record import record_verified, write_report

    if sample_n is not None and sample_n < 1:
        raise InputError("--sample must be at least 1")
    if report is not None:
        from .writable import require_writable

        require_writable(report.parent if report.parent != Path("") else Path("."), "--report file")
    show = progress_enabled(err, quiet or json_out)
    hub_source = None  # a repo id: fetched as the checks need it (hub/verify_stream.py)
    if _streams_from_hub(source):
        from .hub.verify_stream import HubVerifySource
        from .spec import parse_size

        limit = parse_size(max_disk) if max_disk is not None else None  # a size <= 0 is refused there
        hub_source = HubVerifySource(source, converted, revision=revision, max_disk=limit, work_dir=work_dir)
        folder, trust = Path(source), None
        if dry_run:
            from .hub.verify_stream import print_dry_run
            from .verify import pick_device
            from .verify_journal import run_options

            dev = pick_device(device)
            will_decode = (dev == "cuda") if decode is None else decode
            run = run_options(sample_n, seed, dev if will_decode else None, not skip_hashes)
            with err.status(f"planning: reading {source}'s headers and scales from the Hub", spinner="dots") if show else _null():
                d = {"disk": hub_source.dry_run(decode=will_decode, run=run)}
            if json_out:
                emit("verify", d)
            else:
                print_dry_run(d["disk"], lambda line: out.print(line, highlight=False))
            return
    else:
        if max_disk is not None or work_dir is not None or dry_run:
            raise InputError("--max-disk, --work-dir and --dry-run apply to a Hub repo id as source (a local source is read in place)")
        folder, trust = _resolve(source, revision)
    from .folder_lock import folder_lock

    lock = folder_lock(converted, "verify", shared=True) if converted.is_dir() else _null()
    with lock, byte_progress(err, show) as prog:
        task = prog.add_task("verify: reading headers", total=None, kept=0)

        shown = [""]  # what the display last named: each stage and shard is drawn at least once

        def on_stage(what: str, total: int) -> None:
            shown[0] = what
            prog.update(task, description=f"verify: {what}", total=total or None, refresh=True)

        def on_bytes(shard: str, n: int) -> None:
            changed = shard != shown[0]
            shown[0] = shard
            prog.update(task, advance=n, description=f"verify: {shard}", refresh=changed)

        def on_resume(kept: int, total: int) -> None:
            if not (quiet or json_out):
                prog.console.print(
                    f"resumed: {kept} of {total} shard(s) passed in an earlier run and are unchanged; checking the other {total - kept}",
                    highlight=False,
                )

        kw = dict(
            sample=sample_n, device=device, decode=decode, hash_files=not skip_hashes, workers=max(0, workers), source_label=source, seed=seed,
            on_bytes=on_bytes, on_stage=on_stage, on_resume=on_resume,
        )  # fmt: skip
        if hub_source is None:
            res = _naming(converted, run_verify)(folder, converted, trust_root=trust, **kw)
        else:
            with download_line(prog, lambda: hub_source.files):
                res = _verify_from_hub(hub_source, source, converted, revision, run_verify, kw, quiet or json_out)
        prog.update(task, description="verify")
    body = res.to_json()
    if report is not None:
        write_report(report, body)
    cached = record_verified(converted, body)
    if json_out:
        emit("verify", _verify_json(body))
        return
    t = Table(title=f"verify: {converted} ({res.target})")
    layers = sorted(res.layers, key=lambda r: _layer_key(r.prefix))
    decoded = any(r.decoded for r in layers)
    cols = ["expert module", "checked", "rescaled", "rescale error"] + (["decoded", "max abs diff"] if decoded else [])
    for c in cols:
        t.add_column(c, justify="left" if c == "expert module" else "right", no_wrap=c == "expert module")
    for r in layers:
        row = [r.prefix, f"{r.checked}/{r.experts}", str(r.rescaled), f"{100 * r.max_rel:.3f}%"]
        if decoded:
            row += [str(r.decoded), f"{r.max_abs:.3g}" if r.max_abs is not None else "-"]
        t.add_row(*row)
    out.print(t)
    if any(r.rescaled for r in layers):
        out.print(RESCALE_NOTE, highlight=False)
    for g in res.copied_groups:
        out.print(f"{g['prefix']}: {g['experts']} experts, {g['format']}, copied: every byte identical to the source")
    out.print("checks that ran:")
    for c in res.checks:
        out.print(f"  - {c}", highlight=False)
    if res.note:
        out.print(f"note: {res.note}", highlight=False)
    if report is not None:
        out.print(f"report written to {report}", highlight=False)
    if cached is None and not quiet:
        err.print("[yellow]warning:[/yellow] could not record the result in the cache; push's model card will not quote it", highlight=False)
    out.print(
        f"[green]OK[/green]: {res.files_hashed} files hashed, {res.copied_tensors} copied tensors byte-identical ({res.device}, {res.seconds:.1f} s)",
        highlight=False,
    )


def _verify_from_hub(hub_source: Any, source: str, converted: Path, revision: str | None, run_verify: Any, kw: dict, quiet: bool) -> Any:
    """``verify`` against a Hub repo id, its source fetched within ``--max-disk`` into a temporary
    folder that is removed however the run ends. When the Hub cannot be reached at all, the cached
    snapshot is read as a folder, as ``convert`` does."""
    from .hub.fetch import HubUnreachable
    from .spec import human

    def started(folder: Path, limit: int) -> None:
        if quiet:
            return
        for old, size in hub_source.removed:
            err.print(f"removed {old} ({human(size)}), left by an earlier verify that was killed", highlight=False, soft_wrap=True)
        err.print(f"source files fetched as the checks need them into {folder} (at most {human(limit)} at once; removed at the end)", highlight=False, soft_wrap=True)

    hub_source.on_start = started
    try:
        with hub_source:
            return _naming(converted, run_verify)(Path(source), converted, hub=hub_source, **kw)
    except HubUnreachable:
        folder, trust = _resolve(source, revision)
        return _naming(converted, run_verify)(folder, converted, trust_root=trust, **kw)


def _naming(path: Path, fn: Any) -> Any:
    """``fn``, with an ``OSError`` that names no file (a read on a descriptor: EIO...) naming ``path``."""

    def call(*a: Any, **k: Any) -> Any:
        try:
            return fn(*a, **k)
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise

    return call


def _verify_json(body: dict) -> dict:
    d = dict(body)
    d.pop("ok", None)
    d["modules"] = [
        {
            "prefix": l["prefix"],
            "experts": l["experts"],
            "checked": l["checked"],
            "rescaled_experts": l["rescaled"],
            "max_rescale_error": l["max_rel"],
            "decoded": l["decoded"],
            "max_abs_error": l["max_abs"],
            "sampled": l["sampled"],
        }
        for l in sorted(d.pop("layers"), key=lambda l: _layer_key(l["prefix"]))
    ]
    return d


@app.command(name="inspect", cls=_Command)
def inspect_cmd(
    source: str = typer.Argument(..., metavar="SOURCE", help="A checkpoint: a local folder or a Hub repo id (read by HTTP range requests).", show_default=False),
    revision: str | None = typer.Option(None, metavar="REV", help="Hub revision, for a repo id."),
    engine: str | None = typer.Option(None, "--engine", metavar="ENGINE", help="Gate the exit code on one engine (vllm-0.34) or engine:backend (vllm-0.34:marlin)."),
    json_out: bool = flag(False, "--json", JSON_HELP),
) -> None:
    """What an NVFP4 MoE checkpoint holds and what each engine does with it, from headers and scalars
    alone (exit 0: every engine loads it as is; 5: one loses accuracy or fails; 2: bad input)."""
    from .inspect_view import run_inspect

    rc = run_inspect(source, revision=revision, as_json=json_out, engine=engine, out=out)
    if rc:
        raise typer.Exit(rc)


@app.command(cls=_Command)
def push(
    converted: Path = typer.Argument(..., metavar="FOLDER", help="A complete converted folder (never changed by push).", show_default=False),
    repo_id: str = typer.Argument(..., metavar="REPO_ID", help="Hub repo id to create or update (org/name).", show_default=False),
    token: str | None = typer.Option(None, "--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or the one `hf auth login` saved)."),
    private: bool = flag(False, "--private/--public", "Create the repo private (an existing repo keeps its visibility)."),
    revision: str | None = typer.Option(None, metavar="BRANCH", help="Branch to push to (created if missing)."),
    commit_message: str | None = typer.Option(None, metavar="TEXT", help="Commit message."),
    base_model: str | None = typer.Option(None, metavar="REPO_ID", help="base_model for the model card (default: the source recorded by convert, if a repo id)."),
    card: bool = flag(True, "--card/--no-card", "Upload a model card as README.md (the folder's own README.md is left as is)."),
    force: bool = flag(False, "--force", "Push even if the folder is not a complete, matching conversion."),
    dry_run: bool = flag(False, "--dry-run", "Check the folder and print what would be uploaded; no network."),
    json_out: bool = flag(False, "--json", JSON_HELP),
) -> None:
    """Upload a converted folder to the Hugging Face Hub with a model card, then check the Hub's hashes.

    Nothing in FOLDER changes; a push of what the Hub already has is a no-op that says so."""
    from . import hub
    from .folder_lock import folder_lock
    from .manifest import load_manifest
    from .spec import human
    from .verify_record import read_verified

    if not converted.is_dir():
        raise InputError(f"{converted} is not a folder")
    if json_out:  # one JSON object and nothing else: no upload bars either
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with folder_lock(converted, "push"):
        man = load_manifest(converted)
        card_text = None
        if card and man is not None:
            card_text = hub.push_card(man.to_json(), repo_id, base_model=base_model, verify_summary=read_verified(converted))
        res = hub.push(
            converted, repo_id, private=private, revision=revision, commit_message=commit_message, force=force,
            card=card_text, token=token, dry_run=dry_run,
        )  # fmt: skip
    body = {
        "repo_id": res.repo_id,
        "revision": res.revision,
        "dry_run": dry_run,
        "up_to_date": res.up_to_date,
        "repo_url": res.repo_url,
        "commit": res.commit_oid,
        "files": res.uploaded,
        "bytes": res.bytes,
        "checked": res.checked,
        "attempts": res.attempts,
        "card": res.card_written,
        "notes": res.notes,
    }
    if json_out:
        emit("push", body)
        return
    for n in res.notes:
        err.print(f"[yellow]note:[/yellow] {n}", highlight=False)
    if dry_run:
        out.print(f"would push {len(res.uploaded)} files ({human(res.bytes)}) to {repo_id}@{res.revision}:", highlight=False)
        for f in res.uploaded:
            out.print(f"  {f}", highlight=False)
        out.print("(dry run: nothing uploaded, nothing changed)")
        return
    if res.up_to_date:
        out.print(
            f"{repo_id}@{res.revision} already holds these {len(res.checked)} files (Hub hashes match); nothing pushed",
            highlight=False,
        )
        return
    out.print(
        f"[green]pushed[/green] {len(res.checked)} files to {res.repo_url} (commit {res.commit_oid}); Hub hashes match the local files",
        highlight=False,
    )


@app.command(cls=_Command)
def sample(
    output: Path = typer.Argument(..., metavar="OUTPUT", help="Folder to write the sample checkpoint into (created; must be empty).", show_default=False),
    arch: str = typer.Option("modelopt", "--arch", metavar="ARCH", help="modelopt (names from --scheme), deepseek-v4 (a recipe's real format, --recipe) or deepseek-v41 (NVIDIA's V4.1 format)."),
    recipe: str | None = typer.Option(None, "--recipe", metavar="RECIPE", help="deepseek-v4 only: nvidia (ModelOpt's recipe, the default) or canada (canada-quant's)."),
    scheme: str | None = typer.Option(None, "--scheme", metavar="SCHEME", help="modelopt only: tensor names: deepseek (the default), hf, mixtral, compressed-tensors."),
    layers: int | None = typer.Option(None, metavar="N", help="Layers (modelopt: 3, layer 0 dense; deepseek-v4: 4, the first 3 hash-routed)."),
    experts: int = typer.Option(8, metavar="N", help="Routed experts per MoE layer."),
    hidden: int | None = typer.Option(None, metavar="H", help="Hidden size (default 512: the mega-moe target needs multiples of 512)."),
    intermediate: int | None = typer.Option(None, metavar="I", help="Expert intermediate size (default 512)."),
    shards: int = typer.Option(3, metavar="N", help="Number of shards."),
    values: str | None = typer.Option(None, metavar="DTYPE", help="deepseek-v4 only: dtype of the NVFP4 experts' packed values, U8 (default) or I8."),
    unequal_scale_2: bool = flag(False, "--unequal-scale-2", "modelopt only: give gate and up different weight_scale_2."),
    scale_encoding: str | None = typer.Option(
        None, metavar="ENCODING", help="modelopt only: store every block scale compressed, csf or csf_32x2_v1 (weight_scale_encoding, as vLLM 0.34 reads it)."
    ),
    seed: int | None = typer.Option(None, metavar="N", help="Random seed (default: random)."),
    json_out: bool = flag(False, "--json", JSON_HELP),
) -> None:
    """Write a small real-format NVFP4 MoE checkpoint (random weights, real quantization).

    Its default sizes convert with every target."""
    from .sample_cli import check_sample_options, write_sample

    check_sample_options(arch, recipe, scheme, values, unequal_scale_2, layers, experts, hidden, intermediate, shards, output, scale_encoding)
    what = write_sample(
        output, arch, recipe, scheme, layers, experts, hidden, intermediate, shards, values, unequal_scale_2, seed, scale_encoding
    )
    if json_out:
        emit("sample", {"output": str(output), "description": what})
        return
    out.print(f"{what} written to {output}", highlight=False)


def _json_requested(argv: list[str]) -> str | None:
    """The command, when ``--json`` is among ``argv`` (then errors are JSON on stdout too)."""
    if "--json" not in argv:
        return None
    cmds = [a for a in argv if a in ("convert", "verify", "push", "inspect", "sample")]
    return cmds[0] if cmds else "nvfp4-fuse"


def _os_error_line(e: OSError) -> str:
    what = e.strerror or str(e)
    path = e.filename
    if e.errno == errno.ENOSPC:
        what = "no space left on the device"
    elif e.errno == errno.EDQUOT:
        what = "disk quota exceeded"
    elif e.errno == errno.EROFS:
        what = "read-only file system"
    elif e.errno in (errno.EACCES, errno.EPERM):
        what = "permission denied"
    if path is not None:
        extra = f" -> {e.filename2}" if e.filename2 else ""
        return f"{what}: {path}{extra}"
    return what


def main() -> None:
    json_cmd = _json_requested(sys.argv[1:])

    def fail(code: int, message: str) -> None:
        if json_cmd:
            emit(json_cmd, error_body(code, message), ok=False)
        sys.exit(code)

    def interrupted() -> None:
        line = "interrupted; rerun the same command to resume" if sys.argv[1:2] == ["convert"] else "interrupted"
        err.print(line)
        fail(EXIT_INTERRUPTED, line)

    def mapped_fault(line: str) -> None:
        """A read through the mapping of a file that shrank (SIGBUS, in any thread): the one error line
        (and the JSON error), then exit 2 with nothing cleaned up (mapped_faults.py says why that
        resumes)."""
        lead = "\n" if sys.stderr.isatty() else ""  # a progress bar may have the line
        os.write(2, f"{lead}error: {line}\n".encode(errors="replace"))
        if json_cmd:
            body = json.dumps(envelope(json_cmd, error_body(EXIT_BAD_INPUT, line), ok=False), indent=1)
            os.write(1, (body + "\n").encode())
        os._exit(EXIT_BAD_INPUT)

    mapped_faults.install(mapped_fault)

    try:
        rc = app(standalone_mode=False)
        if rc == EXIT_INTERRUPTED:  # typer answers Ctrl-C by returning 130, saying nothing
            interrupted()
    except Nvfp4FuseError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        fail(e.exit_code, str(e))
    except KeyboardInterrupt:
        interrupted()
    except SystemExit:
        raise
    except OSError as e:  # permissions, read-only file system, no space, quota: the path and what to fix
        line = _os_error_line(e)
        err.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
        fail(EXIT_BAD_INPUT, line)
    except Exception as e:  # usage errors come through here too (typer's own click, in standalone_mode=False)
        if isinstance(e, typer.Abort):  # click turns Ctrl-C into Abort
            interrupted()
        if isinstance(e, typer.TyperException) and hasattr(e, "show"):  # a usage error: bad option, missing argument
            e.show()
            fail(EXIT_BAD_INPUT, e.format_message() if hasattr(e, "format_message") else str(e))
        err.print_exception()
        err.print(f"[red]internal error:[/red] {type(e).__name__}: {e}")
        fail(EXIT_INTERNAL, f"internal error: {type(e).__name__}: {e}")
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()

__all__ = ["app", "main", "__version__"]
