"""``nvfp4-fuse inspect`` on the command line: run it on a folder or repo id, print the report as
tables (80 columns) or JSON, and return the exit code (0: every engine considered loads the
checkpoint as is; 4: one loses accuracy or fails; bad input raises :class:`InputError`, exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .errors import InputError
from .inspect import exit_code, expert_ranges, inspect, local_input, remote_input

VERDICT_STYLE = {
    "loads": "[green]loads[/green]",
    "lossy": "[yellow]lossy[/yellow]",
    "fails": "[red]fails[/red]",
    "n/a": "[dim]n/a[/dim]",
    "unknown": "[dim]unknown[/dim]",
}


def _engine_matches(engine: str, row_id: str, engine_id: str) -> bool:
    return engine in (row_id, engine_id) or row_id.startswith(engine + ":")


def run_inspect(source: str, *, revision: str | None, as_json: bool, engine: str | None, out: Console) -> int:
    from .engines import ENGINES

    if engine is not None and not any(_engine_matches(engine, f"{e.id}:{e.backend}", e.id) for e in ENGINES):
        choices = sorted({e.id for e in ENGINES} | {f"{e.id}:{e.backend}" for e in ENGINES})
        raise InputError(f"--engine {engine!r} is none of: {', '.join(choices)}")
    p = Path(source)
    if p.exists():
        if revision:
            raise InputError("--revision applies to Hub repo ids, not to local folders")
        inp = local_input(p)
    elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise InputError(f"{source} is not a folder, and HF_HUB_OFFLINE is set: cannot read the Hub")
    else:
        inp = remote_input(source, revision=revision)
    report = inspect(inp)
    if engine is not None:
        report["engines"] = [r for r in report["engines"] if _engine_matches(engine, r["id"], r["engine_id"])]
        report["gated_on"] = engine
    rc = exit_code(report)
    report["exit_code"] = rc
    if as_json:
        out.print_json(json.dumps(report))
    else:
        print_report(report, out)
    return rc


def _defects(g: dict[str, Any]) -> str:
    parts = []
    for name in ("w13", "w2"):
        s = g[f"input_scale_{name}"]
        roles = ("gate", "up") if name == "w13" else ("down",)
        for k, short in (("missing", "miss"), ("zero", "0"), ("nan", "NaN"), ("inf", "Inf"), ("negative", "neg")):
            n = sum(len(s[r][k]) for r in roles)
            if n:
                parts.append(f"{name} {n} {short}")
    return ", ".join(parts) or "-"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def print_report(report: dict[str, Any], out: Console) -> None:
    # the report's prose is wrapped at the terminal's width (the CLI's console keeps long lines whole)
    def say(*objects: Any, **kw: Any) -> None:
        out.print(*objects, soft_wrap=False, **kw)

    src, cfg = report["source"], report["config"]
    say(f"[bold]{src['path']}[/bold]: {src['shards']} shards, {src['tensors']} tensors")
    t = Table(title="routed-expert groups (layer order)", box=box.SIMPLE, pad_edge=False, title_justify="left")
    for c, j in (("layer", "left"), ("format", "left"), ("E", "right"), ("H x I", "right"), ("block scale", "left"),
                 ("s2 differ", "right"), ("input scales", "left"), ("spread", "right")):  # fmt: skip
        t.add_column(c, justify=j, overflow="fold", no_wrap=c in ("block scale", "H x I", "format"))
    for g in report["groups"]:
        if "scale_2" not in g:
            t.add_row(g["layer"], g["format"], str(g.get("experts", "")), "", g.get("naming", {}).get("block_scale") or "", "",
                      "[red]defect[/red]" if g.get("problem") else "", "")  # fmt: skip
            continue
        s2 = g["scale_2"]
        t.add_row(
            g["layer"], "NVFP4", str(g["experts"]), f"{g['hidden']}x{g['intermediate']}",
            g["naming"].get("block_scale_encoding") or g["naming"]["block_scale"],
            f"{s2['pairs_differ']} ({_fmt(s2['worst_ratio'])}x)" if s2["pairs_differ"] else "0",
            _defects(g), f"{_fmt(g['input_scale_w13']['spread'])}/{_fmt(g['input_scale_w2']['spread'])}",
        )  # fmt: skip
    say(t)
    say("s2 differ: gate/up weight_scale_2 pairs that differ (worst max/min); spread: input-scale max/min, w13/w2")
    nv = [g for g in report["groups"] if "scale_2" in g]
    if nv:
        n0 = nv[0]["naming"]
        say(f"naming: {nv[0]['prefix']} ({n0['projections']}), fields {n0['fields']}, scalars {n0['scalar_shape']}")
    for g in report["groups"]:
        if g.get("scale_2", {}).get("pairs_differ"):
            say(f"  {g['prefix']}: scale_2 differ in experts {expert_ranges(g['scale_2']['experts_differ'])}")
        for name in ("w13", "w2"):
            sc = g.get(f"input_scale_{name}")
            if sc:
                for r in ("gate", "up", "down"):
                    for k in ("missing", "zero", "nan", "inf", "negative"):
                        if sc.get(r, {}).get(k):
                            say(f"  {g['prefix']}: {r} input_scale {k} in experts {expert_ranges(sc[r][k])}")
        if g.get("problem"):
            say(f"  [red]defect[/red] {g['prefix']}: {g['problem']}")
    if report["summary"].get("input_all_one"):
        say("  every input_scale is 1.0 (a placeholder, not a calibration)")
    for p in report["problems"]:
        say(f"  [red]defect[/red] {p}")
    if report["csf"]["streams"]:
        say(f"CSF block scales: {report['csf']['encoded_scales']} scales in {report['csf']['streams']} stream tensors "
                  f"({', '.join(report['csf']['encodings'])})")  # fmt: skip
    keys = ("model_type", "architectures", "quant_method", "quant_algo", "moe_quant_algo", "group_size", "weight_scale_encoding",
            "quantized_layers", "producer", "fused_experts")  # fmt: skip
    shown = []
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            shown.append(
                f"{k}={json.dumps(v, separators=(',', ':'))}" + (f" ({cfg[k + '_from']})" if cfg.get(k + "_from") else "")
            )
    for k in ("ignore", "exclude_modules"):
        if cfg.get(k):
            shown.append(f"{k}: " + ", ".join(f"{n} ({len(v)})" for n, v in cfg[k].items()))
    say("config: " + ("; ".join(shown) if shown else "no config.json / hf_quant_config.json"))
    reads = src.get("reads") or {}
    if "range_requests" in reads:
        say(f"read {report['scalars_read']} scalars with {reads['range_requests']} HTTP range requests "
                  f"({reads['range_bytes']} bytes; {reads['config_requests']} config GETs)")  # fmt: skip
    else:
        say(f"read {report['scalars_read']} scalars from the local shards")
    # one row per engine and verdict, its backends together; each distinct finding once, below
    notes: list[str] = []
    rows: dict[tuple[str, str, tuple[int, ...]], list[str]] = {}
    for r in report["engines"]:
        refs = []
        for m, x in zip(r["messages"], r["rules"] or [None] * len(r["messages"])):
            src_note = f" [dim]({x['source']}, {x['version']}{', inferred' if x['inferred'] else ''})[/dim]" if x else ""
            text = m + src_note
            if r["verdict"] == "loads":
                continue
            if text not in notes:
                notes.append(text)
            refs.append(notes.index(text) + 1)
        rows.setdefault((r["engine"], r["verdict"], tuple(refs)), []).append(r["backend"])
    e = Table(title="engines", box=box.SIMPLE, pad_edge=False, title_justify="left")
    e.add_column("engine", no_wrap=True)
    e.add_column("backends", overflow="fold", ratio=1)
    e.add_column("verdict", no_wrap=True)
    e.add_column("why", no_wrap=True)
    for (eng, verdict, refs), backends in rows.items():
        e.add_row(eng, ", ".join(backends), VERDICT_STYLE[verdict], " ".join(f"[{k}]" for k in refs))
    say(e)
    for k, text in enumerate(notes, 1):
        say(f"[{k}] {text}", highlight=False)
    gate = f" (gated on {report['gated_on']})" if report.get("gated_on") else ""
    say(
        f"exit code {report['exit_code']}{gate}: "
        + ("every engine loads it as is" if report["exit_code"] == 0 else "some engine loses accuracy or fails")
    )
