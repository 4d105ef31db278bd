"""The disk a conversion from the Hub holds besides its output, planned and bounded.

The **working set** is what the run owns on disk that is not (yet) part of its result: source files
downloaded into the run's own folder (complete, or arriving) and output shards being written (their
``.partial`` files, counted at full size from the moment one is started until it is renamed into place
and journaled). Finished output shards are the result, not the working set; source files read from
the user's HF cache cost nothing (they are only read).

The plan is a sequence of **steps**, one per output shard still to write, in file order, then one per
sidecar file: each step needs some source files and writes one output. Disk is reserved in one fixed
order (:class:`DiskPlan.items`): for each step, the source files it is first to need, then its
output. A source file is given back once the last step needing it is done. Reserving in that order,
and never past a reservation that does not fit, cannot deadlock: whatever is reserved belongs to
steps at or before the one waiting, and those finish. The smallest budget that lets every step
through (:attr:`DiskPlan.minimum`) is the largest, over the steps, of the source files alive at that
step (needed at or before it and at or after it) plus its output; smaller budgets are refused.

The same planner serves ``verify`` from the Hub (:func:`check_steps`): its steps are the sidecars it
compares, then the output shards it checks, one at a time in file order; they write nothing, so the
working set is the source files alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .errors import InputError
from .safetensors_header import build_header
from .spec import OutputSpec, OutShard, human

# A fused part's source: the roles it is made from, and which of their fields.
FUSED_PARTS = {
    "w13_weight": (("gate", "up"), "weight"),
    "w2_weight": (("down",), "weight"),
    "w13_weight_scale": (("gate", "up"), "weight_scale"),
    "w2_weight_scale": (("down",), "weight_scale"),
}


def shard_source_files(spec: OutputSpec, shard: OutShard) -> list[str]:
    """The source files an output shard's tensors are read from, in order of first use."""
    seen: dict[str, None] = {}

    def add(ref) -> None:
        if ref is None:
            return
        if ref.encoded is not None:
            for file, _ in ref.encoded.streams.values():
                seen.setdefault(file)
        else:
            seen.setdefault(ref.file)

    for t in shard.tensors:
        if t.kind in ("copy", "decoded", "scalar"):
            add(t.source)
        elif t.kind == "fused":
            layer = spec.layers[t.layer]
            roles, fld = FUSED_PARTS[t.part]
            for e in range(layer.dims.experts):
                for role in roles:
                    add(layer.parts.get((e, role, fld)))
        elif t.kind == "expert":
            role, fld = t.part.split(".")
            add(spec.layers[t.layer].parts.get((t.expert, role, fld)))
        # "global": computed from the layer's scalars, read while planning
    return list(seen)


def shard_disk_bytes(spec: OutputSpec, shard: OutShard) -> int:
    """An output shard's size on disk: its header and its tensors."""
    return len(build_header(shard.entries, spec.shard_metadata())) + shard.data_bytes


@dataclass(frozen=True)
class Item:
    kind: str  # "file" (a source file to fetch) | "out" (an output shard to write)
    name: str
    size: int
    step: int


@dataclass
class DiskPlan:
    steps: list[tuple[str | None, list[str]]]  # (output shard or None for a sidecar, source files needed)
    items: list[Item]  # reservations, in the one order they are made
    last_use: dict[str, int]  # source file -> the last step needing it
    sizes: dict[str, int]  # what each fetched file and each output costs
    minimum: int  # smallest budget every step fits in
    total_fetch: int  # bytes of every file fetched
    total_out: int  # bytes of every output shard written

    def ticket(self, kind: str, name: str) -> int:
        return self._tickets[(kind, name)]

    def __post_init__(self) -> None:
        self._tickets = {(it.kind, it.name): i for i, it in enumerate(self.items)}

    def peak(self, limit: int | None) -> int:
        """The largest working set of a run under ``limit`` (``None``: unbounded, everything fetched
        ahead), when downloads set the pace: each reservation is made as soon as it fits, a step
        finishes only when its reservations are made, and steps finish in order."""
        return self.simulate(limit)[0]

    def disk_peak(self, limit: int | None) -> int:
        """The most disk the run holds at once (finished output shards included), as :meth:`peak`."""
        return self.simulate(limit)[1]

    def simulate(self, limit: int | None) -> tuple[int, int]:
        """-> (working set peak, disk peak) of :meth:`peak`'s run."""
        held = peak = disk = finished_out = 0
        finished = -1  # steps up to this one are done
        reserved = -1  # items up to this one are reserved
        last_item = {it.step: i for i, it in enumerate(self.items)}
        alive: dict[str, int] = {}
        outs: dict[int, int] = {}

        def finish_next() -> bool:
            nonlocal held, finished, finished_out
            k = finished + 1
            if k >= len(self.steps) or last_item.get(k, -1) > reserved:
                return False
            finished_out += outs.get(k, 0)
            held -= outs.pop(k, 0)
            for f in [f for f in alive if self.last_use[f] == k]:
                held -= alive.pop(f)
            finished = k
            return True

        for i, it in enumerate(self.items):
            while limit is not None and held + it.size > limit:
                if not finish_next():
                    raise AssertionError(f"budget {limit} below the plan's minimum {self.minimum}")
            held += it.size
            reserved = i
            if it.kind == "out":
                outs[it.step] = it.size
            else:
                alive[it.name] = it.size
            peak = max(peak, held)
            disk = max(disk, held + finished_out)
        return peak, disk


Steps = list[tuple[str | None, list[str]]]  # (output shard, or None for a sidecar; source files it needs)


def convert_steps(spec: OutputSpec, todo: list[OutShard], *, decode: bool = False) -> tuple[Steps, dict[str, int]]:
    """``convert``'s steps: each output shard of ``todo`` (in order), then each sidecar it copies; and
    what each output shard costs on disk while it is written. With ``decode`` (``--push-to`` checking
    each shard with the end-to-end decode) a shard's step also holds the files its check decodes from
    (:func:`shard_check_files`): the source values of the block scales it holds."""
    steps: Steps = [(s.name, shard_check_files(spec, s, decode=decode)) for s in todo]
    skipped = set(spec.configs()) | {"README.md"}  # written from the plan, or describing the source: not copied
    steps += [(None, [rel]) for rel in spec.source.sidecars if rel not in skipped]
    return steps, {s.name: shard_disk_bytes(spec, s) for s in todo}


def check_steps(spec: OutputSpec, shards: list[OutShard], sidecars: list[str], *, decode: bool) -> tuple[Steps, dict[str, int]]:
    """``verify``'s steps: each sidecar it compares, then each output shard it checks (in order). It
    writes nothing, so no step has an output to reserve disk for."""
    steps: Steps = [(None, [rel]) for rel in sidecars]
    steps += [(s.name, shard_check_files(spec, s, decode=decode)) for s in shards]
    return steps, {}


def shard_check_files(spec: OutputSpec, shard: OutShard, *, decode: bool) -> list[str]:
    """The source files the checks of one output shard read (checked alone): those it was made from,
    and with the end-to-end ``decode`` the files of the source values of the expert parts whose block
    scales it holds (decoded with it when the values are in another output shard)."""
    files = shard_source_files(spec, shard)
    if not decode:
        return files
    seen = dict.fromkeys(files)
    for t in shard.tensors:
        if t.kind == "fused" and FUSED_PARTS[t.part][1] == "weight_scale":
            layer = spec.layers[t.layer]
            roles = FUSED_PARTS[t.part][0]
            refs = [layer.parts.get((e, r, "weight")) for e in range(layer.dims.experts) for r in roles]
        elif t.kind == "expert" and t.part.endswith(".weight_scale"):
            refs = [spec.layers[t.layer].parts.get((t.expert, t.part.split(".")[0], "weight"))]
        else:
            continue
        for ref in refs:
            if ref is not None:
                seen.setdefault(ref.file)
    return list(seen)


def plan_disk(spec: OutputSpec, todo: list[OutShard], sizes: dict[str, int], *, local: set[str] = frozenset()) -> DiskPlan:
    """The steps and reservations of writing ``todo`` (in order) then copying the sidecars, from a
    source whose files have ``sizes``; files in ``local`` (the user's HF cache) cost nothing."""
    return plan_steps(*convert_steps(spec, todo), sizes, local=local)


def plan_steps(steps: Steps, out_sizes: dict[str, int], sizes: dict[str, int], *, local: set[str] = frozenset()) -> DiskPlan:
    """The reservations of running ``steps`` in order, from a source whose files have ``sizes`` (a
    sidecar step for a file the source does not list is left out); a step named in ``out_sizes``
    also writes an output that size; files in ``local`` (the user's HF cache) cost nothing."""
    steps = [(name, files) for name, files in steps if name is not None or all(f in sizes for f in files)]
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for k, (_, files) in enumerate(steps):
        for f in files:
            first.setdefault(f, k)
            last[f] = k
    items: list[Item] = []
    cost = {f: (0 if f in local else sizes[f]) for f in first}
    for k, (name, files) in enumerate(steps):
        for f in files:
            if first[f] == k and cost[f]:
                items.append(Item("file", f, cost[f], k))
        if name is not None and name in out_sizes:
            items.append(Item("out", name, out_sizes[name], k))
    minimum = 0
    for k, (name, _) in enumerate(steps):
        alive = sum(cost[f] for f in first if first[f] <= k <= last[f])
        minimum = max(minimum, alive + out_sizes.get(name or "", 0))
    return DiskPlan(steps, items, last, {**cost, **out_sizes}, minimum, sum(cost.values()), sum(out_sizes.values()))


def check_budget(plan: DiskPlan, limit: int) -> None:
    if limit < plan.minimum:
        need = (
            "this conversion needs at least {} (the source files one output shard reads, and that shard, at once)"
            if plan.total_out
            else "this verify needs at least {} (the source files the checks of one output shard read, at once)"
        )
        raise InputError(f"--max-disk {human(limit)} is too small: " + need.format(human(plan.minimum)))


def default_budget(plan: DiskPlan) -> int:
    """Twice the minimum: the next output shards' source files download while one is written."""
    return 2 * plan.minimum


class BudgetClosed(Exception):
    """The run is stopping: nothing more is reserved."""


@dataclass
class OrderedBudget:
    """Reservations of a :class:`DiskPlan`, made strictly in ticket order, each once it fits."""

    limit: int
    held: int = 0
    peak: int = 0
    next_ticket: int = 0
    closed: bool = False
    _cv: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def acquire(self, ticket: int, n: int) -> None:
        with self._cv:
            while not self.closed and (self.next_ticket != ticket or self.held + n > self.limit):
                self._cv.wait(0.5)
            if self.closed:
                raise BudgetClosed
            self.held += n
            self.peak = max(self.peak, self.held)
            self.next_ticket += 1
            self._cv.notify_all()

    def release(self, n: int) -> None:
        with self._cv:
            self.held -= n
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()
