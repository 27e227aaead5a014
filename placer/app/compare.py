"""ColocRL's Table 1 for our graphs and clusters: every baseline's step time side by side.

Mirhoseini et al. (ICML 2017), Table 1: per model and device count, the step time of Single-CPU, Single-GPU,
Scotch, MinCut, Expert and the RL placement, plus RL's speed-up over the best baseline. :func:`compare` builds
the same layout from :mod:`placer.baselines` and the simulator:

- rows: one per (graph, cluster);
- columns: Single-CPU, Single-GPU, Scotch, MinCut, Expert, then the other baselines (METIS, Baechi's m-TOPO /
  m-ETF / m-SCT, HEFT, PipeDream-DP, Random, Round-robin), then any ``extra`` columns (the RL placer joins here);
- **Best**: the fastest column; **Speed-up**: ``t(best of Scotch, MinCut, Expert) / t(best) − 1`` (ColocRL's
  "speed-up", which compares RL with the best baseline; 0 % when a reference baseline is itself the best);
- **Efficiency**: ``lower bound / t(best)``, the lower bound of the plans scored
  (:func:`placer.costmodel.plans.plan_lower_bound_s`: every allowed micro-batch count with ``auto``).

Graphs are resolved by :func:`graphs.data.resolve_graph`: a bare name means the ``small`` config, so ColocRL's
table names the paper graphs in full (``rnnlm-paper``; the CLI's default ``--graphs``).

A placement that does not fit memory shows as ``OOM``; a method that does not apply to a cluster (Single-GPU on a
CPU-only cluster) as ``n/a``. With ``schedule="auto"`` each placement is scored under its best schedule and
micro-batch count (:func:`placer.costmodel.plans.best_plan`), shown in its cell (``0.1234 1f1b x8``). With
``real=`` every placement is also measured by the engine and the cells read
``sim (real)``. Results go to ``compare.md``, ``compare.csv`` and ``compare.json`` in ``out_dir``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import numpy as np

from graphs.data import resolve_graph
from graphs.ir import OpGraph
from placer import baselines
from placer.baselines._common import groups_of
from placer.core.cluster import Cluster, get_cluster
from placer.costmodel.costs import CostKind, op_time_s, substitute_costs
from placer.core.placement import Placement
from placer.core.result import StepResult

log = logging.getLogger(__name__)

LABELS: dict[str, str] = {
    "single-cpu": "Single-CPU", "single-gpu": "Single-GPU", "scotch": "Scotch", "mincut": "MinCut",
    "expert": "Expert", "metis": "METIS", "m-topo": "m-TOPO", "m-etf": "m-ETF", "m-sct": "m-SCT", "heft": "HEFT",
    "pipedream-dp": "PipeDream-DP", "random": "Random", "round-robin": "Round-robin", "single": "Single",
}
"""Column titles per method name (others are shown as their name)."""
LEADING = ["single-cpu", "single-gpu", "scotch", "mincut", "expert"]
"""ColocRL's columns, first and in its order."""
REFERENCE = ("scotch", "mincut", "expert")
"""The baselines ColocRL's speed-up is measured against."""

Status = Literal["ok", "oom", "n/a", "failed"]


class ExtraPlacer(Protocol):
    """An extra column (the RL placer): ``(graph, cluster, *, seed, budget_s) -> Placement``."""

    def __call__(self, graph: OpGraph, cluster: Cluster, *, seed: int, budget_s: float | None) -> Placement: ...


Measure = Callable[..., StepResult]
"""Re-measures a placement on real devices (the engine): ``measure(graph, placement) -> StepResult``; with
``schedule="auto"`` it is called ``measure(graph, placement, schedule=name, microbatches=m)`` with the plan the
simulator chose for that placement."""


@dataclass(kw_only=True)
class Cell:
    """One method on one (graph, cluster)."""

    method: str
    status: Status
    step_time_s: float = math.inf
    """Simulated step time (``inf`` unless ``status == "ok"``)."""
    real_step_time_s: float | None = None
    """Engine-measured step time when ``real=`` was given (``inf`` when that run failed)."""
    place_s: float = 0.0
    """Seconds the method took to produce its placement."""
    detail: str = ""
    """Why it is OOM / n/a / failed."""
    placement: Placement | None = None
    plan: str = ""
    """The schedule and micro-batches it was scored with (``1f1b x8``) when the table's schedule is ``auto``."""

    def text(self) -> str:
        if self.status == "ok":
            s = _fmt(self.step_time_s) + (f" {self.plan}" if self.plan else "")
        else:
            s = {"oom": "OOM", "n/a": "n/a", "failed": "fail"}[self.status]
        if self.real_step_time_s is not None:
            s += f" ({_fmt(self.real_step_time_s) if math.isfinite(self.real_step_time_s) else 'fail'})"
        return s


@dataclass(kw_only=True)
class Row:
    """One (graph, cluster) line of the table."""

    graph: str
    cluster: str
    num_devices: int
    cells: dict[str, Cell]
    lower_bound_s: float
    best: str | None
    """Method with the lowest simulated step time (``None`` when every one failed)."""
    speedup: float | None
    """``t(best reference) / t(best) - 1``; ``None`` when no reference baseline or no method ran."""

    @property
    def best_s(self) -> float:
        return self.cells[self.best].step_time_s if self.best else math.inf

    @property
    def efficiency(self) -> float | None:
        ok = self.best and self.best_s > 0 and math.isfinite(self.lower_bound_s)
        return self.lower_bound_s / self.best_s if ok else None


@dataclass(kw_only=True)
class CompareTable:
    """The comparison: ``columns`` (method names, in display order) and one :class:`Row` per (graph, cluster)."""

    columns: list[str]
    rows: list[Row] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    """Settings: schedule, micro-batches, seed, real or not, date."""

    def header(self) -> list[str]:
        return (["Graph", "Cluster"] + [LABELS.get(m, m) for m in self.columns]
                + ["Best", "Speed-up", "Efficiency"])

    def _cells(self, row: Row) -> list[str]:
        out = [row.graph, row.cluster]
        out += [row.cells[m].text() if m in row.cells else "" for m in self.columns]
        out.append(LABELS.get(row.best, row.best) if row.best else "-")
        out.append(f"{row.speedup * 100:.1f}%" if row.speedup is not None else "-")
        eff = row.efficiency
        out.append(f"{eff:.2f}" if eff is not None else "-")
        return out

    def to_markdown(self) -> str:
        head = self.header()
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        if self.meta.get("schedule") == "auto":
            how = "each placement under its best schedule x micro-batches, shown beside its time"
        else:
            how = f"schedule {self.meta.get('schedule')}, {self.meta.get('microbatches')} micro-batch(es)"
        note = (f"Step time in seconds ({self.meta.get('source', 'sim')}, {how}); OOM = out of memory; speed-up = "
                "best of Scotch/MinCut/Expert vs best; efficiency = lower bound / best.")
        if self.meta.get("real"):
            note += " Cells read `sim (real)`."
        return "\n".join(lines) + "\n\n" + note + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        real = bool(self.meta.get("real"))
        cols = ["graph", "cluster", "num_devices", "lower_bound_s"] + [f"{m}_s" for m in self.columns]
        if real:
            cols += [f"{m}_real_s" for m in self.columns]
        auto = self.meta.get("schedule") == "auto"
        if auto:
            cols += [f"{m}_plan" for m in self.columns]
        w.writerow(cols + ["best", "best_s", "speedup", "efficiency"])
        for r in self.rows:
            vals: list[Any] = [r.graph, r.cluster, r.num_devices, _num(r.lower_bound_s)]
            for m in self.columns:
                c = r.cells.get(m)
                vals.append("" if c is None else (_num(c.step_time_s) if c.status == "ok" else c.text()))
            if real:
                for m in self.columns:
                    c = r.cells.get(m)
                    vals.append("" if c is None or c.real_step_time_s is None else _num(c.real_step_time_s))
            if auto:
                vals += [r.cells[m].plan if m in r.cells else "" for m in self.columns]
            vals += [r.best or "", _num(r.best_s) if r.best else "",
                     "" if r.speedup is None else f"{r.speedup:.6g}",
                     "" if r.efficiency is None else f"{r.efficiency:.6g}"]
            w.writerow(vals)
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        def cell(c: Cell) -> dict[str, Any]:
            return {"status": c.status, "step_time_s": _finite(c.step_time_s),
                    "real_step_time_s": None if c.real_step_time_s is None else _finite(c.real_step_time_s),
                    "place_s": c.place_s, "detail": c.detail, "plan": c.plan}

        return {"columns": self.columns, "meta": self.meta,
                "rows": [{"graph": r.graph, "cluster": r.cluster, "num_devices": r.num_devices,
                          "lower_bound_s": _finite(r.lower_bound_s), "best": r.best, "speedup": r.speedup,
                          "efficiency": r.efficiency, "cells": {m: cell(c) for m, c in r.cells.items()}}
                         for r in self.rows]}

    def to_rich(self) -> Any:
        """A ``rich.table.Table`` for the CLI (best cell in bold green, OOM in red)."""
        from rich.table import Table

        t = Table(title="Step time per placement method (s)", show_lines=False)
        for i, h in enumerate(self.header()):
            t.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
        for r in self.rows:
            cells = self._cells(r)
            for j, m in enumerate(self.columns, start=2):
                c = r.cells.get(m)
                if c is not None and m == r.best:
                    cells[j] = f"[bold green]{cells[j]}[/]"
                elif c is not None and c.status == "oom":
                    cells[j] = f"[red]{cells[j]}[/]"
            t.add_row(*cells)
        return t

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``compare.md``, ``compare.csv`` and ``compare.json`` (atomically) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, text in (("compare.md", self.to_markdown()), ("compare.csv", self.to_csv()),
                           ("compare.json", json.dumps(self.to_json(), indent=1, sort_keys=True))):
            p = out / name
            tmp = p.with_suffix(p.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(p)
            paths[name] = p
        return paths


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else "inf"


def _finite(x: float) -> float | None:
    """JSON has no inf / NaN: those become null."""
    return float(x) if math.isfinite(x) else None


def _num(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else "inf"


# ---------------------------------------------------------------------------------------------- lower bound
def simple_lower_bound_s(graph: OpGraph, cluster: Cluster) -> float:
    """No placement beats both (a) the forward+backward critical path with every op on its fastest device and no
    transfers, and (b) all the work shared by all devices at their ideal rates (``1 / Σ_d 1/T_d``, ``T_d`` the
    whole graph on device ``d``). Weaker than :func:`placer.costmodel.bounds.lower_bound_s` (the default); a
    hand check for tests."""
    t = groups_of(graph, cluster).time_s
    op_t = op_time_s(graph, cluster).min(axis=1)
    finish = op_t.copy()
    src, dst = graph.edge_index
    for e in np.argsort(dst, kind="stable"):
        finish[dst[e]] = max(finish[dst[e]], finish[src[e]] + op_t[dst[e]])
    path = float(finish.max()) if graph.n else 0.0
    tot = t.sum(axis=0)
    share = 1.0 / float(np.sum(1.0 / tot[tot > 0])) if np.any(tot > 0) else 0.0
    return max(path, share)


def default_methods() -> list[str]:
    """ColocRL's columns first, then every other registered baseline (``single`` is left out: it duplicates
    Single-CPU / Single-GPU)."""
    rest = [m for m in baselines.names() if m not in LEADING and m != "single"]
    return LEADING + rest


def _cell(col: str, g: OpGraph, c: Cluster, *, extra: Mapping[str, ExtraPlacer], seed: int,
          train_budget_s: float | None, simulate: Callable[[OpGraph, Cluster, Placement], StepResult],
          real: Measure | None, auto: bool = False) -> Cell:
    """Place ``g`` on ``c`` with one column's method, simulate it (and measure it with ``real``)."""
    t0 = time.perf_counter()
    try:
        if col in extra:
            p = extra[col](g, c, seed=seed, budget_s=train_budget_s)
        else:
            p = baselines.place(col, g, c, seed=seed)
    except ValueError as e:
        return Cell(method=col, status="n/a", detail=str(e), place_s=time.perf_counter() - t0)
    place_s = time.perf_counter() - t0
    res = simulate(g, c, p)
    cell = Cell(method=col, placement=p, place_s=place_s,
                status="ok" if res.ok else ("oom" if res.oom else "failed"),
                step_time_s=res.step_time_s if res.ok else math.inf, detail=res.failure or "",
                plan=res.plan_label if auto and res.ok else "")
    if real is not None:
        try:
            rr = real(g, p, schedule=res.schedule, microbatches=res.microbatches) if auto else real(g, p)
            cell.real_step_time_s = rr.step_time_s if rr.ok else math.inf
        except ValueError as e:
            cell.real_step_time_s = math.inf
            cell.detail = (cell.detail + "; " if cell.detail else "") + f"real: {e}"
    log.info("%s on %s: %s = %s (placed in %.2fs)", g.name, c.name, col, cell.text(), place_s)
    return cell


def _row(g: OpGraph, c: Cluster, cells: dict[str, Cell], columns: Sequence[str],
         bound: Callable[[OpGraph, Cluster], float]) -> Row:
    """The table row of one (graph, cluster): best column, ColocRL's speed-up and the lower bound."""
    ok = {m: cl.step_time_s for m, cl in cells.items() if cl.status == "ok"}
    best = min(ok, key=lambda m: (ok[m], columns.index(m))) if ok else None
    ref = [ok[m] for m in REFERENCE if m in ok]
    speedup = (min(ref) / ok[best] - 1.0) if (best and ref and ok[best] > 0) else None
    try:
        lb = float(bound(g, c))
    except ValueError as e:
        log.warning("no lower bound for %s on %s: %s", g.name, c.name, e)
        lb = math.nan
    return Row(graph=g.name, cluster=c.name, num_devices=c.num_devices, cells=cells, lower_bound_s=lb, best=best,
               speedup=speedup)


def compare(
    graphs: Sequence[OpGraph | str | Path],
    clusters: Sequence[Cluster | str],
    *,
    methods: Sequence[str] | None = None,
    real: Measure | None = None,
    train_budget_s: float | None = None,
    out_dir: str | Path | None,
    extra: Mapping[str, ExtraPlacer] | None = None,
    seed: int = 0,
    schedule: str = "none",
    microbatches: int = 1,
    cost_kind: CostKind = None,
    lower_bound: Callable[[OpGraph, Cluster], float] | None = None,
) -> CompareTable:
    """Place every graph on every cluster with every method, simulate one step each, and tabulate.

    ``graphs``: ``OpGraph``s, JSON paths or shipped names (:func:`graphs.data.resolve_graph`; ``rnnlm`` is
    ``rnnlm-small``). ``methods``: baseline names (default :func:`default_methods`). ``extra``: more columns, e.g.
    ``{"RL": rl_placer}``, each called with ``budget_s=train_budget_s``. ``real``: re-measure each placement with
    the engine (``measure(graph, placement)``). ``schedule`` / ``microbatches`` go to
    :func:`placer.costmodel.plans.simulate_plan` (``"auto"``: every method is scored with its placement's best
    schedule and micro-batch count, named in its cell); ``cost_kind`` substitutes cost sets on purpose for every
    method, the simulator and the bound (:func:`placer.costmodel.costs.substitute_costs`). Writes
    ``compare.md/.csv/.json`` into ``out_dir`` unless it is ``None``. Unknown methods and schedules are a one-line
    ``ValueError`` before anything runs.
    """
    # simulator import kept local: it compiles numba kernels on first use
    from placer.costmodel.plans import check_schedule, plan_lower_bound_s, simulate_plan

    check_schedule(schedule)
    methods = list(default_methods() if methods is None else methods)
    for m in methods:
        if m not in baselines.BASELINES and not m.startswith("single:"):
            raise ValueError(f"unknown placement method {m!r}; known: {', '.join(baselines.names())}")
    extra = dict(extra or {})
    columns = methods + [k for k in extra if k not in methods]
    # the bound of the plans the table scores: every allowed M with auto, else the given M
    bound = lower_bound or (lambda g, c: plan_lower_bound_s(g, c, None if schedule == "auto" else [microbatches]))
    gs = [resolve_graph(g) for g in graphs]
    cls = [c if isinstance(c, Cluster) else get_cluster(c) for c in clusters]
    table = CompareTable(columns=columns, meta={
        "schedule": schedule, "microbatches": microbatches, "seed": seed, "real": real is not None,
        "source": "sim", "train_budget_s": train_budget_s, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "graphs": [g.name for g in gs], "clusters": [c.name for c in cls],
    })

    def run_sim(g: OpGraph, c: Cluster, p: Placement) -> StepResult:
        return simulate_plan(g, c, p, schedule=schedule, microbatches=microbatches)

    for g in gs:
        for c in cls:
            gc = substitute_costs(g, c, cost_kind)
            cells = {col: _cell(col, gc, c, extra=extra, seed=seed, train_budget_s=train_budget_s,
                                simulate=run_sim, real=real, auto=schedule == "auto") for col in columns}
            table.rows.append(_row(gc, c, cells, columns, bound))
    if out_dir is not None:
        table.write(out_dir)
    return table
