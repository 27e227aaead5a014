"""Run folders: their names, finding one again, atomic checkpoint writes, the learning-curve picture and the
progress line. Shared by :mod:`placer.app.train` (and its :mod:`placer.app.training` package) and
:mod:`placer.app.place` (reading a trained run back)."""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphs.jsonio import atomic_target


def safe_name(text: str) -> str:
    """``text`` with every character other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``-``."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)


def stamped_name(what: str, policy: str, algo: str, seed: int) -> str:
    """``{what}__{policy}__{algo}__{seed}__{YYYYmmdd-HHMMSS}`` (``what``: the graph, or ``multi-N``)."""
    return f"{safe_name(what)}__{policy}__{algo}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(runs_dir: str | Path, name: str) -> Path:
    """Create ``runs_dir/name`` atomically: ``mkdir`` without ``exist_ok`` claims the name, and while another run
    holds it (two runs started in one second) a ``_`` is appended and the mkdir retried. An unusable ``runs_dir`` is a
    one-line ``ValueError``, and so is a ``name`` that is not one folder name (``../x``, ``a/b``)."""
    root = Path(runs_dir)
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"run name {name!r} must be a folder name (no '/', not '.' or '..'): runs go under {root}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            run_dir = root / (name + "_" * attempt)
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
    except OSError as e:
        raise ValueError(f"cannot create a run folder under {root}: {e.strerror or e}") from None
    raise ValueError(f"cannot create a run folder under {root}: 1000 runs named {name!r} already")


def discard_run_dir(run_dir: Path, *, root_existed: bool) -> None:
    """Remove a run folder that a refused or failed start left, and its runs folder when this start created it and
    nothing else is in it: a refused command leaves nothing behind."""
    shutil.rmtree(run_dir, ignore_errors=True)
    root = run_dir.parent
    if not root_existed and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def find_run(run: str | Path, runs_dir: str | Path, *, checkpoint: bool = False) -> Path:
    """The run folder ``run`` (a path, or a name under ``runs_dir``) with a ``config.json`` and, when
    ``checkpoint``, a ``checkpoint.pt``; a one-line ``ValueError`` otherwise."""
    for cand in (Path(run), Path(runs_dir) / str(run)):
        if (cand / "config.json").exists():
            if checkpoint and not (cand / "checkpoint.pt").exists():
                raise ValueError(f"run {cand} has no checkpoint.pt (was it trained?)")
            return cand
    raise ValueError(f"no {'trained ' if checkpoint else ''}run {str(run)!r}: no config.json there or under {runs_dir}")


def save_torch_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a kill never leaves a half-written checkpoint, and a
    failed write (a full disk) leaves neither the temporary file nor a damaged ``path`` (a link: its target)."""
    path = atomic_target(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def hparams_markdown(rows: dict[str, Any]) -> str:
    """A Markdown table of hyperparameters (TensorBoard's text tab)."""
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in rows.items())


def curve_summary(history: list[dict[str, float]], parts: int = 5) -> str:
    """The learning curve in one line: the per-update mean step time averaged over each ``parts``-th of the
    updates, the best, and how far the last part's mean is above it (a policy that converges ends near 0%; one
    whose mean climbs while the best stays shows it here)."""
    mean = np.array([h["mean_step_time_s"] for h in history], dtype=float)
    mean = mean[np.isfinite(mean)]
    if not mean.size:
        return "learning curve: no finite update"
    best = min(h["best_step_time_s"] for h in history)
    chunks = [c for c in np.array_split(mean, min(parts, mean.size)) if c.size]
    means = ", ".join(f"{c.mean():.4g}" for c in chunks)
    gap = f"{chunks[-1].mean() / best - 1:.1%}" if math.isfinite(best) and best > 0 else "n/a"
    return (f"learning curve ({len(history)} updates in {len(chunks)} parts): mean step {means} s; best {best:.4g} s, "
            f"the last part's mean {gap} above it")


def plot_learning_curve(path: Path, history: list[dict[str, float]], baselines: dict[str, float], *,
                        title: str) -> None:
    """Best and mean step time vs training time and vs samples, with baseline lines (atomic PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    t = np.array([h["elapsed_s"] for h in history])
    n = np.array([h["samples"] for h in history])
    best = np.array([h["best_step_time_s"] for h in history])
    mean = np.array([h["mean_step_time_s"] for h in history])
    finite = [v for v in baselines.values() if math.isfinite(v)]
    for ax, x, label in ((axes[0], t, "training wall time (s)"), (axes[1], n, "sampled placements")):
        if len(x):
            ax.plot(x, mean, color="tab:blue", alpha=0.35, lw=0.8, label="mean of update")
            ax.plot(x, best, color="tab:red", lw=1.8, label="best so far")
        for i, (m, v) in enumerate(sorted(baselines.items(), key=lambda kv: kv[1])):
            if math.isfinite(v):
                ax.axhline(v, ls="--", lw=0.8, color=plt.cm.tab10((i + 2) % 10), label=f"{m} {v:.4g}s")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("step time (s)")
    values = [v for v in np.concatenate([best, mean]) if math.isfinite(v)] + finite
    if values:  # zoom on the interesting range: up to 3x the best value; farther baselines stay in the legend
        lo, hi = min(values), max(values)
        axes[0].set_ylim(lo * 0.95, min(hi, 3 * lo) * 1.05)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class Progress:
    """A rich progress line (best step time, samples/s) over the time budget; silent when disabled. When the
    output is not a terminal (a log file, a pipe) a plain line every ``PLAIN_EVERY_S`` seconds replaces the bar:
    a live bar there is cut with "…" at 80 columns and its redraws are noise."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, enabled: bool, budget_s: float, done_s: float) -> None:
        import sys

        self.bar = None
        self.plain = enabled and not sys.stdout.isatty()
        self.budget_s, self.last_plain, self.text = budget_s, time.perf_counter(), ""
        if enabled and not self.plain:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                    TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("training", total=budget_s, completed=done_s)

    def update(self, elapsed_s: float, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=elapsed_s, description=text)
        elif self.plain:
            self.text = f"training {elapsed_s:.0f}/{self.budget_s:.0f} s: {text}"
            if time.perf_counter() - self.last_plain >= self.PLAIN_EVERY_S:
                print(self.text, flush=True)
                self.last_plain = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.plain and self.text:
            print(self.text, flush=True)
