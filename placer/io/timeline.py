"""Timeline output of a :class:`~placer.core.result.StepResult`: a Perfetto/Chrome trace and a Gantt PNG.

Both need a result with events (``simulate(..., timeline=True)`` or an engine run that records them). Tracks are
the devices (in cluster order) then the links (``src->dst``) that carried something; an activation transfer is
named after its producer op and a gradient transfer ``grad:<op>``.

The Chrome trace uses the Trace Event Format's complete events (``ph: "X"``, microseconds) with one thread per
track and ``thread_name`` metadata, which both ``chrome://tracing`` and https://ui.perfetto.dev open.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from placer.core.result import StepResult, TimelineEvent


def _require_events(result: StepResult) -> tuple[TimelineEvent, ...]:
    if not result.timeline:
        raise ValueError("this result has no timeline events; simulate with timeline=True")
    return result.timeline


def tracks(result: StepResult) -> list[str]:
    """Track names in display order: devices first (cluster order), then links."""
    names = list(result.devices)
    seen = set(names)
    links = sorted({e.track for e in result.timeline if e.track not in seen})
    return names + links


def chrome_trace(result: StepResult) -> dict[str, Any]:
    """The trace as a JSON-able dict."""
    events = _require_events(result)
    tid = {t: i for i, t in enumerate(tracks(result))}
    out: list[dict[str, Any]] = [{"ph": "M", "pid": 0, "name": "process_name",
                                  "args": {"name": f"step ({result.source}, {result.schedule}, "
                                                   f"M={result.microbatches})"}}]
    for name, i in tid.items():
        out.append({"ph": "M", "pid": 0, "tid": i, "name": "thread_name", "args": {"name": name}})
        out.append({"ph": "M", "pid": 0, "tid": i, "name": "thread_sort_index", "args": {"sort_index": i}})
    for e in events:
        out.append({"ph": "X", "pid": 0, "tid": tid[e.track], "name": e.op, "cat": e.phase,
                    "ts": e.start_s * 1e6, "dur": max(e.end_s - e.start_s, 0.0) * 1e6,
                    "args": {"microbatch": e.microbatch, "phase": e.phase}})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"step_time_s": result.step_time_s, "schedule": result.schedule,
                          "microbatches": result.microbatches, "source": result.source}}


def to_chrome_trace(result: StepResult, path: str | Path) -> Path:
    """Write the Perfetto/Chrome trace JSON (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(chrome_trace(result)))
    tmp.replace(path)
    return path


_HATCH = {"fwd": "", "bwd": "////", "send": "....", "update": "xx"}
MAX_HATCHED_BARS = 1500
"""Above this many bars (after merging back-to-back ones) the Gantt uses shades instead of hatching."""


def plot_gantt(result: StepResult, path: str | Path, *, title: str | None = None) -> Path:
    """A Gantt chart PNG: one row per track, colour = micro-batch, hatching = phase (fwd plain, bwd ``////``,
    transfers ``....``, update grey ``xx``; above :data:`MAX_HATCHED_BARS` bars, bwd is a paler shade instead).
    Idle gaps (pipeline bubbles) stay white."""
    # the object API renders with Agg and never touches pyplot's global backend state
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    events = _require_events(result)
    rows = tracks(result)
    row = {t: i for i, t in enumerate(rows)}
    cmap = matplotlib.colormaps["tab10" if result.microbatches <= 10 else "tab20"]
    # one broken_barh call per (track, micro-batch, phase) keeps thousands of events fast
    groups: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        groups[(e.track, e.microbatch, e.phase)].append((e.start_s, max(e.end_s - e.start_s, 0.0)))
    span = max(e.end_s for e in events) or 1.0
    # back-to-back intervals of one group merge into one bar: same picture, far fewer (hatched) rectangles
    eps = span * 1e-4
    for key, spans in groups.items():
        spans.sort()
        merged = [list(spans[0])]
        for s0, w in spans[1:]:
            last = merged[-1]
            if s0 <= last[0] + last[1] + eps:
                last[1] = max(last[1], s0 + w - last[0])
            else:
                merged.append([s0, w])
        groups[key] = [(a, b) for a, b in merged]
    scale, unit = (1e3, "ms") if span < 1 else (1.0, "s")
    fig = Figure(figsize=(12, 0.45 * len(rows) + 1.8))
    ax = fig.subplots()
    # hatching costs ~5 ms per rectangle in Agg; past a few thousand bars, backward/send bars are drawn in a
    # lighter (bwd) or darker-edged (send) shade of the micro-batch colour instead
    hatched = sum(len(v) for v in groups.values()) <= MAX_HATCHED_BARS
    for (track, mb, phase), spans in groups.items():
        colour = (0.6, 0.6, 0.6, 1.0) if mb < 0 else cmap(mb % cmap.N)
        if not hatched and phase == "bwd":
            colour = tuple(0.45 * c + 0.55 for c in colour[:3]) + (1.0,)
        ax.broken_barh([(s * scale, w * scale) for s, w in spans], (row[track] - 0.4, 0.8), facecolors=colour,
                       edgecolor="0.2" if hatched else "face", linewidth=0.2 if hatched else 0.0,
                       hatch=_HATCH.get(phase, "") if hatched else None)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlim(0, span * scale * 1.01)
    ax.set_xlabel(f"time ({unit})")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    ax.set_title(title or f"{result.source} step {result.step_time_s * scale:.4g} {unit} — schedule "
                          f"{result.schedule}, {result.microbatches} micro-batch(es)")
    mbs = sorted({e.microbatch for e in events if e.microbatch >= 0})
    handles = [Patch(facecolor=cmap(m % cmap.N), label=f"mb {m}") for m in mbs[:20]]
    if hatched:
        handles += [Patch(facecolor="white", edgecolor="black", hatch=_HATCH[p], label=p)
                    for p in ("fwd", "bwd", "send")]
    else:
        handles += [Patch(facecolor="0.35", label="fwd (full colour)"), Patch(facecolor="0.75", label="bwd (pale)")]
    handles.append(Patch(facecolor="0.6", edgecolor="black", hatch=_HATCH["update"] if hatched else None,
                         label="update"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
