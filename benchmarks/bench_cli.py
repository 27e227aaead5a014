"""CLI start-up time: how long ``placer --help`` and ``placer graph show`` take from a cold interpreter.

Prints, at the end (median of ``--repeats`` runs each, interleaved so that drift of the VM hits both)::

    figure: cli_startup_s[help] = S         # python -m placer.app.cli --help
    figure: cli_startup_s[graph_show] = S   # python -m placer.app.cli graph show graphs/data/nmt-small.json

Both commands run in a fresh ``python3`` process (what a user's shell does), so the figure includes the
interpreter's own start-up (~0.05 s) and every module the command imports. Target: under 1.5 s each (issue 21).
Run: ``python3 benchmarks/bench_cli.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "help": ["--help"],
    "graph_show": ["graph", "show", str(ROOT / "graphs" / "data" / "nmt-small.json")],
}


def run_once(args: list[str]) -> float:
    """Wall seconds of one ``python -m placer.app.cli ARGS`` (raises if the command fails)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "placer.app.cli", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    run_once(COMMANDS["help"])  # warm the OS file cache and __pycache__ once; not counted
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            times[name].append(run_once(cmd))
    for name, ts in times.items():
        print(f"# {name}: " + " ".join(f"{t:.2f}" for t in ts) + f" s (min {min(ts):.2f}, max {max(ts):.2f})")
        print(f"figure: cli_startup_s[{name}] = {statistics.median(ts):.2f}")


if __name__ == "__main__":
    main()
