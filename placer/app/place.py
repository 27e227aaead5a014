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
import json
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
from placer.core.cluster import Cluster
from placer.io.document import save_placement
from placer.core.placement import Placement
from placer.core.result import StepResult
from placer.app.cli_base import int_at_least, writable_file
from placer.app.runs import find_run
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


def place_zero_shot(run: str | Path, graph: OpGraph | str | Path, cluster: Cluster | str | Path, *,
                    runs_dir: str | Path = "runs", samples: int = 1, seed: int = 0,
                    graph_config: str = "small", schedule: str | None = None) -> ZeroShotResult:
    """Place ``graph`` on ``cluster`` with the policy of ``run`` (module docstring); candidates are scored under
    ``schedule`` (``None``: the run's; ``"auto"``: each under its best schedule and micro-batch count)."""
    from placer.costmodel.plans import check_schedule, simulate_plan

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    t0 = time.perf_counter()
    run_dir = find_run(run, runs_dir, checkpoint=True)
    config = json.loads((run_dir / "config.json").read_text())
    graph = resolve_graph(graph, config=graph_config)
    cluster = resolve_cluster(cluster)
    problem = build_problem(graph, cluster, int(config.get("num_groups", 256)))
    policy = make_policy(config.get("policy", "gnn"), problem, hidden=int(config.get("hidden", 64)),
                         **dict(config.get("policy_options") or {}))
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")
    try:
        policy.load_state_dict(state["policy"])
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
    _, groups, res = best
    method = f"rl:{config.get('policy', 'gnn')}+{config.get('algo', 'reinforce')}+zero-shot"
    return ZeroShotResult(placement=problem.expand(groups), device_of_group=groups, predicted=res, method=method,
                          elapsed_s=time.perf_counter() - t0, schedule=schedule)


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
    parser.add_argument("--runs-dir", default="runs", help="where run names are looked up (default %(default)s)")


def run_place(args: argparse.Namespace) -> ZeroShotResult:
    """``placer place``: place, write ``--out``, print one summary line."""
    out = writable_file(args.out, "placement")  # before the policy is loaded
    res = place_zero_shot(args.policy_from, args.graph, args.cluster, runs_dir=args.runs_dir, samples=args.samples,
                          seed=args.seed, graph_config=args.graph_config, schedule=args.schedule)
    graph = resolve_graph(args.graph, config=args.graph_config)
    cluster = resolve_cluster(args.cluster)
    save_placement(out, graph, cluster, res.placement, method=res.method, seed=args.seed,
                   run=Path(args.policy_from).name, predicted=res.predicted, schedule=res.schedule,
                   microbatches=res.predicted.microbatches)
    step = f"{res.predicted.step_time_s:.6g} s" if res.predicted.ok else f"failed ({res.predicted.failure})"
    print(f"placed {graph.name} on {cluster.name} with {res.method} in {res.elapsed_s:.2f} s: "
          f"simulated step {step} -> {out}")
    return res
