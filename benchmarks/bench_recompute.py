"""Activation recomputation on real workers: what it costs, simulated against measured.

gpt ``medium``'s even layer split on calibrated ``cpu-2`` under ``1f1b x8``, once as it is and once with both
workers recomputing (``recompute=(0, 1)``: every fused segment under ``torch.utils.checkpoint``), measured in 3
interleaved rounds on one warm :class:`placer.engine.Measurer` (median). Prints each plan's simulated and
measured step and the engine's activation accounting per worker, then::

    figure: recompute_cost_sim[gpt] = X    simulated step with recomputation / without
    figure: recompute_cost_real[gpt] = X   measured step with recomputation / without (medians of the rounds)

Run: ``flock /work/bench.lock python3 benchmarks/bench_recompute.py`` (about 5 minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphs.data import resolve_graph  # noqa: E402
from placer.app.measured import PlanRow, even_split, measure_interleaved  # noqa: E402
from placer.app.train import maybe_calibrate  # noqa: E402
from placer.core.cluster import get_cluster  # noqa: E402
from placer.costmodel.sim import Simulator  # noqa: E402


def main() -> None:
    graph = resolve_graph("gpt-medium", config="medium")
    cluster = maybe_calibrate(get_cluster("cpu-2"), mode="always")
    sim = Simulator(graph, cluster)
    pl = even_split(graph, cluster)
    rows = []
    for name, redo in (("even 1f1b x8", ()), ("even 1f1b x8 +recompute", (0, 1))):
        r = sim.run(pl, schedule="1f1b", microbatches=8, recompute=redo)
        rows.append(PlanRow(name=name, label="even-layers", placement=pl, schedule="1f1b", microbatches=8,
                            sim_s=r.step_time_s, recompute=redo))
    measure_interleaved(graph, cluster, rows, rounds=3, steps=2, warmup=2)
    for row in rows:
        peak = [int(x) for x in row.result.peak_memory_bytes] if row.result is not None else []
        print(f"{row.name}: simulated {row.sim_s:.3f} s, measured {row.real_s:.3f} s (rounds "
              f"{', '.join(f'{x:.3f}' for x in row.real_rounds_s)}), activation accounting {peak} bytes")
    plain, redo = rows
    print(f"figure: recompute_cost_sim[gpt] = {redo.sim_s / plain.sim_s:.3f}")
    print(f"figure: recompute_cost_real[gpt] = {redo.real_s / plain.real_s:.3f}")


if __name__ == "__main__":
    main()
