"""``placer place``: zero-shot placement of a graph with a trained run's policy (Placeto, Addanki et al.,
NeurIPS 2019: a GNN policy trained on some graphs places unseen graphs of the family without retraining).

The run's ``config.json`` names the policy and its sizes, ``checkpoint.pt`` holds its weights (runs of
:mod:`placer.app.train` on one graph or several, with REINFORCE or PPO, in any checkpoint version). The new
graph is grouped as the run grouped its graphs, the policy's most likely placement is taken (or, with
``samples > 1``, the best by simulation of that and ``samples - 1`` sampled ones), and the result is simulated
and written as a ``placer.placement/v1`` document. The ``gnn`` policy has no size-dependent weights, so any graph
and any cluster work; ``seq2seq`` needs the run's number of devices.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from envs.placement_env import resolve_cluster, resolve_graph
from placer.app.cli_base import preset_names, schedule_names
from envs.problem import build_problem
from graphs.ir import OpGraph
from graphs.jsonio import read_json
from placer.core.cluster import Cluster
from placer.io.document import save_placement
from placer.core.placement import Placement
from placer.core.result import StepResult
from placer.app.cli_base import int_at_least, writable_file
from placer.app.runs import find_run
from placer.app.training.checkpoint import read_checkpoint
from policies import PolicyInput, make_policy

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ZeroShotResult:
    placement: Placement
    device_of_group: np.ndarray
    predicted: StepResult
    """The placement simulated on the full op graph."""
    method: str
    """``rl:<policy>+<algo>+zero-shot``."""
    elapsed_s: float
    """Wall time of grouping, inference and simulation."""
    schedule: str = "none"
    """The schedule asked for (``auto``: ``predicted`` says which schedule and micro-batches were chosen)."""
    source: str = "policy"
    """``policy``, or ``seeded by <baseline>`` when a baseline's placement beat the policy's (``seed_baselines``)."""


def place_zero_shot(run: str | Path, graph: OpGraph | str | Path, cluster: Cluster | str | Path, *,
                    runs_dir: str | Path = "runs", samples: int = 1, seed: int = 0,
                    graph_config: str = "small", schedule: str | None = None,
                    seed_baselines: bool = False) -> ZeroShotResult:
    """Place ``graph`` on ``cluster`` with the policy of ``run`` (module docstring); candidates are scored under
    ``schedule`` (``None``: the run's; ``"auto"``: each under its best schedule and micro-batch count). With
    ``seed_baselines`` every registered baseline's placement competes too, so the result is never worse than the
    best of them (``source`` then says ``seeded by <baseline>`` when one won)."""
    from placer.costmodel.plans import check_schedule, simulate_plan

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    t0 = time.perf_counter()
    run_dir = find_run(run, runs_dir, checkpoint=True)
    config = read_json(run_dir / "config.json", "run config")
    if not isinstance(config, dict):
        raise ValueError(f"{run_dir / 'config.json'}: not a run config (a JSON object expected)")
    graph = resolve_graph(graph, config=graph_config)
    cluster = resolve_cluster(cluster)
    problem = build_problem(graph, cluster, int(config.get("num_groups", 256)))
    policy = make_policy(config.get("policy", "gnn"), problem, hidden=int(config.get("hidden", 64)),
                         **dict(config.get("policy_options") or {}))
    state = read_checkpoint(run_dir / "checkpoint.pt")
    try:
        policy.load_state_dict(state["policy"])
    except (RuntimeError, KeyError) as e:
        # torch's first line only says "Error(s) in loading state_dict for ...": the next one says what
        first = " ".join(line.strip() for line in str(e).strip().splitlines()[:2]) or type(e).__name__
        raise ValueError(f"the policy of {run_dir.name} does not fit {graph.name!r} on {cluster.name!r}: "
                         f"{first}") from None
    policy.eval()
    inp = PolicyInput.from_problem(problem)
    schedule = check_schedule(schedule or config.get("schedule", "none"))
    microbatches = int(config.get("microbatches", 1))
    found = []
    with torch.no_grad():
        for _ in policy.views():  # e.g. a GNN trained with finish_dropout: with and without its finish column
            found.append(policy.sample(inp, 1, greedy=True).actions)
            if samples > 1:
                found.append(policy.sample(inp, samples - 1, generator=torch.Generator().manual_seed(seed)).actions)
    cands = torch.cat(found)
    best: tuple[float, np.ndarray, StepResult] | None = None
    for groups in np.unique(cands.numpy(), axis=0):
        res = simulate_plan(graph, cluster, problem.expand(groups), schedule=schedule, microbatches=microbatches)
        t = res.step_time_s if res.ok else float("inf")
        if best is None or t < best[0]:
            best = (t, groups, res)
    assert best is not None
    t_best, groups, res = best
    method = f"rl:{config.get('policy', 'gnn')}+{config.get('algo', 'reinforce')}+zero-shot"
    placement, source = problem.expand(groups), "policy"
    if seed_baselines:
        won = _best_baseline(graph, cluster, schedule, microbatches, seed)
        if won is not None and won[2].step_time_s < t_best:
            source, placement, res = f"seeded by {won[0]}", won[1], won[2]
            groups = problem.project(placement)
    return ZeroShotResult(placement=placement, device_of_group=groups, predicted=res, method=method,
                          elapsed_s=time.perf_counter() - t0, schedule=schedule, source=source)


def _best_baseline(graph: OpGraph, cluster: Cluster, schedule: str, microbatches: int,
                   seed: int) -> tuple[str, Placement, StepResult] | None:
    """The fastest feasible registered baseline under ``schedule`` (None when none fits)."""
    from placer import baselines
    from placer.app.training.trainer import evaluate_baselines

    scored = evaluate_baselines(graph, cluster, baselines.names(), schedule=schedule, microbatches=microbatches,
                                seed=seed)
    ok = {m: v for m, v in scored.items() if v[1].ok}
    if not ok:
        return None
    m = min(ok, key=lambda k: (ok[k][1].step_time_s, k))
    return m, ok[m][0], ok[m][1]


def zero_shot_placer(run: str | Path, *, runs_dir: str | Path = "runs", samples: int = 256):
    """A :class:`placer.app.compare.ExtraPlacer` that places every graph of a comparison with ``run``'s policy,
    without training (``placer compare --policy-from RUN``)."""

    def place(graph: OpGraph, cluster: Cluster, *, seed: int, budget_s: float | None) -> Placement:
        return place_zero_shot(run, graph, cluster, runs_dir=runs_dir, samples=samples, seed=seed).placement

    return place


def add_place_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``placer place`` options."""
    parser.add_argument("--policy-from", required=True, metavar="RUN",
                        help="trained run folder (or its name under --runs-dir)")
    parser.add_argument("--graph", required=True, help="benchmark name or graph JSON to place")
    parser.add_argument("--config", dest="graph_config", default="small",
                        help="benchmark config for a bare name: small or paper (default %(default)s)")
    parser.add_argument("--cluster", required=True, help=f"cluster preset ({preset_names()}) or JSON")
    parser.add_argument("--out", required=True, help="placement JSON to write")
    parser.add_argument("--samples", type=int_at_least(1), default=256,
                        help="1: the policy's most likely placement; K: best of it and K-1 samples, simulated "
                             "(default %(default)s: about a second for 180 groups)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", default="auto", choices=schedule_names(),
                        help="schedule the candidates are scored under (default auto: each placement's best "
                             "schedule and micro-batch count)")
    parser.add_argument("--no-seed-baselines", dest="seed_baselines", action="store_false",
                        help="return the policy's placement even when a baseline's plan is faster (by default every "
                             "baseline competes, and the result says 'seeded by <baseline>' when one wins)")
    parser.add_argument("--runs-dir", default="runs", help="where run names are looked up (default %(default)s)")


def run_place(args: argparse.Namespace) -> ZeroShotResult:
    """``placer place``: place, write ``--out``, print one summary line."""
    out = writable_file(args.out, "placement")  # before the policy is loaded
    res = place_zero_shot(args.policy_from, args.graph, args.cluster, runs_dir=args.runs_dir, samples=args.samples,
                          seed=args.seed, graph_config=args.graph_config, schedule=args.schedule,
                          seed_baselines=args.seed_baselines)
    graph = resolve_graph(args.graph, config=args.graph_config)
    cluster = resolve_cluster(args.cluster)
    save_placement(out, graph, cluster, res.placement, method=res.method, seed=args.seed,
                   run=Path(args.policy_from).name, predicted=res.predicted, schedule=res.schedule,
                   microbatches=res.predicted.microbatches, source=res.source)
    step = f"{res.predicted.step_time_s:.6g} s" if res.predicted.ok else f"failed ({res.predicted.failure})"
    how = res.method if res.source == "policy" else f"{res.method}, {res.source}"
    print(f"placed {graph.name} on {cluster.name} with {how} in {res.elapsed_s:.2f} s: "
          f"simulated step {step} ({res.predicted.schedule_label}) -> {out}")
    return res
