"""``placer train``, ``place``, ``compare`` and ``demo``. The ``train`` options are generated from
:class:`placer.app.train.TrainConfig` and the algorithms' config dataclasses (:mod:`placer.app.cli_config`); the
trainer, the policies and torch are imported only when one of these commands runs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

from placer.app.cli_base import (command, console, int_at_least, load_graph_arg, method_names, parse_duration,
                                 preset_names, schedule_names, writable_folder)
from placer.app.cli_config import Option, add_options, given, options_of


@command("compare", "ColocRL's table: every method on every graph and cluster")
def _compare_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--graphs", default="rnnlm-paper,nmt-paper,inception_v3-paper",
                   help="comma list of graph JSONs or shipped graphs")
    p.add_argument("--clusters", default="cpu+2gpu,cpu+4gpu",
                   help=f"comma list of cluster presets ({preset_names()}) or cluster JSONs")
    p.add_argument("--methods", help=f"comma list of baselines (default: all): {method_names()}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="auto", choices=schedule_names(),
                   help="micro-batch schedule (default auto: each placement under its best schedule and micro-batch "
                        "count, named in its cell)")
    p.add_argument("--microbatches", type=int_at_least(1), default=1, help="micro-batches (ignored with auto)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--train-budget", metavar="DURATION", type=parse_duration,
                   help="also train RL placers for this long per graph and cluster (e.g. 10m) and add their columns")
    from policies.registry import ALGOS, POLICIES

    p.add_argument("--rl", default="seq2seq+reinforce", metavar="FAMILIES",
                   help=f"with --train-budget: comma list of POLICY+ALGO families, one column each (default "
                        f"%(default)s, the RL column; policies {', '.join(sorted(POLICIES))}; algorithms "
                        f"{', '.join(sorted(ALGOS))}; a bare policy means +reinforce)")
    p.add_argument("--policy-from", action="append", default=[], metavar="RUN",
                   help="add a column placing every graph zero-shot with this trained run's policy (repeatable)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> None:
    import time

    from placer.app.compare import compare
    from placer.app.place import zero_shot_placer
    from placer.app.runs import discard_run_dir, find_run, new_run_dir
    from placer.app.train import family_column, family_placer

    writable_folder(args.runs_dir, "runs folder")
    graphs = [load_graph_arg(g) for g in args.graphs.split(",") if g]
    clusters = [c for c in args.clusters.split(",") if c]
    if not graphs or not clusters:
        raise ValueError(f"--{'graphs' if not graphs else 'clusters'} names nothing to compare")
    extra = {}
    budget_s = args.train_budget
    if budget_s:
        for family in (f for f in args.rl.split(",") if f):
            extra[family_column(family)] = family_placer(family, runs_dir=args.runs_dir, schedule=args.schedule,
                                                         microbatches=args.microbatches)
    for run in args.policy_from:
        run_dir = find_run(run, args.runs_dir, checkpoint=True)  # a missing run fails before anything is placed
        extra[f"zero-shot:{run_dir.name}"] = zero_shot_placer(run_dir, runs_dir=args.runs_dir)
    # claimed atomically up front (two comparisons started in one second get two folders), removed if refused
    root_existed = Path(args.runs_dir).exists()
    out_dir = new_run_dir(args.runs_dir, f"compare__{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        table = compare(graphs, clusters,
                        methods=args.methods.split(",") if args.methods else None, seed=args.seed,
                        schedule=args.schedule, microbatches=args.microbatches, out_dir=out_dir,
                        extra=extra, train_budget_s=budget_s)
    except BaseException:
        discard_run_dir(out_dir, root_existed=root_existed)
        raise
    # Markdown, not a rich table: the table has ~18 columns and must stay readable in any terminal width
    print(table.to_markdown())
    console.print(f"wrote {out_dir}/compare.md and compare.csv")


# ---------------------------------------------------------------------------------------------- place
@command("place", "place a graph zero-shot with a trained policy (no training)")
def _place_parser(p: argparse.ArgumentParser) -> None:
    from placer.app.place import add_place_arguments

    add_place_arguments(p)
    p.set_defaults(func=cmd_place)


def cmd_place(args: argparse.Namespace) -> None:
    from placer.app.place import run_place

    run_place(args)


# ---------------------------------------------------------------------------------------------- demo
@command("demo", "end to end: graph -> baselines -> RL -> real engine -> table + placement.json")
def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--graph", default="gpt-medium",
                   help="shipped benchmark graph (a bare name: its small config) or graph JSON (default gpt-medium)")
    p.add_argument("--build", action="store_true", help="trace and profile the model afresh")
    p.add_argument("--cluster", default="cpu-2", help=f"cluster preset ({preset_names()}) or JSON (default cpu-2)")
    p.add_argument("--budget", type=parse_duration, default=120.0, help="RL training time (default 2m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int_at_least(1), default=2, help="engine steps per plan per round (default 2)")
    p.add_argument("--rounds", type=int_at_least(1), default=3,
                   help="interleaved measurement rounds of the winner, Single and the even split (default 3)")
    p.add_argument("--schedule", default="auto", choices=schedule_names(),
                   help="schedule RL and the table score placements with (default auto: each placement's best)")
    p.add_argument("--microbatches", type=int_at_least(1), default=8, help="micro-batches for --schedule (default 8)")
    p.add_argument("--no-real", action="store_true", help="simulator only")
    p.add_argument("--op-costs", choices=("engine", "profile"), default="engine",
                   help="op costs to simulate with: read off a Single run on the workers now (default), or the "
                        "graph's shipped profile")
    p.add_argument("--runs-dir", default="runs")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from placer.app.demo import DemoConfig, run_demo

    if not args.budget > 0:
        raise ValueError(f"--budget must be positive, got {args.budget:g} s")
    writable_folder(args.runs_dir, "runs folder")
    result = run_demo(DemoConfig(graph=args.graph, build=args.build, cluster=args.cluster, budget_s=args.budget,
                                 seed=args.seed, runs_dir=args.runs_dir, steps=args.steps, rounds=args.rounds,
                                 schedule=args.schedule, microbatches=args.microbatches, real=not args.no_real,
                                 op_costs=args.op_costs),
                      say=console.print)
    print()
    print(result.table_markdown)
    console.print(f"best: {result.best_method} at {result.best_step_time_s:.3f} s; "
                  f"demo took {result.wall_s:.0f} s")
    for what, path in result.files.items():
        console.print(f"  {what:>15}: {path}")


# ---------------------------------------------------------------------------------------------- train
TRAIN_ALIASES = {"graph_config": ("--config",), "self_imitation_coef": ("--self-imitation",)}
"""Flags kept from the hand-written parser beside the generated ones."""


def _registries() -> dict[str, Callable[[], list[str]]]:
    """Allowed values of the ``TrainConfig`` fields that name registry entries."""
    from envs.rewards import BACKENDS
    from placer import baselines
    from placer.costmodel.plans import schedule_choices
    from policies.registry import ALGOS, POLICIES

    return {"policy": lambda: sorted(POLICIES), "algo": lambda: sorted(ALGOS), "reward": lambda: sorted(BACKENDS),
            "schedule": schedule_choices, "reference": lambda: sorted(baselines.BASELINES),
            "warm_start": lambda: ["best", *sorted(baselines.BASELINES)]}


def train_options() -> tuple[list[Option], dict[str, list[Option]]]:
    """The generated options: :class:`TrainConfig`'s, and per algorithm of :data:`policies.registry.ALGOS` those
    of its config dataclass (a field several algorithms share is one option, see :func:`_train_parser`)."""
    from placer.app.training.config import TrainConfig
    from placer.baselines import BASELINES
    from policies.registry import ALGOS

    run = options_of(TrainConfig, skip=("algo_config",), aliases=TRAIN_ALIASES, choices=_registries(),
                     metavars={"resume": "RUN"}, notes={
                         "cluster": f"Presets: {preset_names()}.",
                         "baselines": f"Methods: {', '.join(sorted(BASELINES))}.",
                         "graph": "Required unless --graphs, --random-dags or --resume."})
    per_algo = {name: options_of(spec.config_class, skip=("seed",), aliases=TRAIN_ALIASES, show_default=False)
                for name, spec in sorted(ALGOS.items())}
    return run, per_algo


def _starting_values(field: str, algos: list[str]) -> str:
    """Where ``field`` starts for each algorithm, one graph / several (:data:`PRESETS` over the config's default)."""
    import dataclasses

    from placer.app.training.config import PRESETS, algo_config_class

    parts = []
    for algo in algos:
        default = next(f.default for f in dataclasses.fields(algo_config_class(algo)) if f.name == field)
        one, several = (PRESETS[mode].get(algo, {}).get(field, default) for mode in ("one-graph", "multi-graph"))
        parts.append(f"{algo} {one}" + ("" if one == several else f" (several graphs: {several})"))
    return " Starts at: " + "; ".join(parts) + "."


@command("train", "train an RL placement policy on one graph or several (writes runs/{graph}__{policy}__{algo}__"
                  "{seed}__{ts}/)")
def _train_parser(p: argparse.ArgumentParser) -> None:
    run, per_algo = train_options()
    add_options(p, run)
    seen: dict[str, tuple[Option, list[str]]] = {}
    for algo, options in per_algo.items():
        for opt in options:
            seen.setdefault(opt.field, (opt, []))[1].append(algo)
    group = p.add_argument_group("algorithm hyper-parameters (the algorithm's own config; the PRESETS entry of the "
                                 "run's mode starts them, the ones given replace it)")
    for opt, algos in seen.values():
        help_text = f"[{', '.join(algos)}] {opt.kwargs['help']}{_starting_values(opt.field, algos)}"
        group.add_argument(*opt.flags, **dict(opt.kwargs, help=help_text.replace("%%", "%").replace("%", "%%")))
    p.add_argument("--finish-dropout", type=float, default=argparse.SUPPRESS, metavar="X",
                   help="gnn+reinforce: hide the finish-estimate column from this share of the training samples "
                        "(`placer place` then tries both views; the benchmark uses 0.5); sets "
                        "policy_options finish_dropout")
    p.set_defaults(func=cmd_train)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`TrainConfig` of ``placer train``'s options: the run fields given, and the algorithm fields
    given in ``algo_config`` (they replace the preset's values, whatever they are). An option of another
    algorithm, or a run option beside ``--resume`` that a resumed run does not take, is a one-line error."""
    from placer.app.training.config import RESUME_OVERRIDES, TrainConfig

    run, per_algo = train_options()
    fields = given(args, run)
    algo = fields.get("algo", "reinforce")
    mine = {opt.field for opt in per_algo.get(algo, [])}
    algo_fields: dict[str, Any] = {}
    for options in per_algo.values():
        for opt in options:
            if hasattr(args, opt.field) and opt.field not in algo_fields:
                if opt.field not in mine:
                    owners = [a for a, opts in per_algo.items() if any(o.field == opt.field for o in opts)]
                    raise ValueError(f"{opt.flags[0]} is a hyper-parameter of {', '.join(owners)}, not of "
                                     f"--algo {algo}")
                algo_fields[opt.field] = getattr(args, opt.field)
    if hasattr(args, "finish_dropout"):
        if (fields.get("policy"), algo) != ("gnn", "reinforce"):
            raise ValueError(f"--finish-dropout needs --policy gnn --algo reinforce, not "
                             f"{fields.get('policy', 'seq2seq')}+{algo}")
        fields["policy_options"] = {**fields.get("policy_options", {}), "finish_dropout": args.finish_dropout}
    if fields.get("resume"):
        extra = sorted(set(fields) - {*RESUME_OVERRIDES, "resume", "runs_dir"}) + sorted(algo_fields)
        if extra:
            raise ValueError(f"--resume continues its run's config; it does not take "
                             f"{', '.join('--' + k.replace('_', '-') for k in extra)}")
    elif not (fields.get("graph") or fields.get("graphs") or fields.get("random_dags")):
        raise ValueError("placer train needs --graph (or --graphs / --random-dags, or --resume RUN)")
    return TrainConfig(**fields, algo_config=algo_fields)


def cmd_train(args: argparse.Namespace) -> None:
    from placer.app.train import train

    config = config_from_args(args)
    writable_folder(config.runs_dir, "runs folder")  # before calibration, baselines or training
    result = train(config)
    if len(result.outcomes) > 1:
        for name, out in result.outcomes.items():
            console.print(f"  {name:>24}: best {out.best_step_time_s * 1e3:.2f} ms (sim), reference "
                          f"{out.reference_step_time_s * 1e3:.2f} ms")
        console.print(f"multi-graph run folder: {result.run_dir} ({result.updates} rounds, {result.samples} samples)")
        return
    print_train_summary(result, config.budget_s, refine_s=config.refine_s)


def print_train_summary(result: Any, budget_s: float, *, refine_s: float = 0.0) -> None:
    """A one-graph run's summary. Numbers are compared like with like: the RL placement's *simulated* step time
    sits among the baselines' simulated ones, and an engine measurement (``real`` / ``sim+real``) is a separate
    line, since the baselines were not measured; every number says where it comes from."""
    from placer.app.runs import curve_summary

    out = result.only
    console.print(f"trained {result.samples} samples, {result.updates} updates in {result.trained_s:.0f} s "
                  f"(the budget, {budget_s:.0f} s, bounds this); the command took {result.wall_s:.0f} s: "
                  f"{result.setup_s:.0f} s before training (graphs, calibration) and {result.outside_s:.0f} s outside "
                  f"the budget (baselines, refinement, final engine re-measurement, files)")
    console.print(curve_summary(out.history))
    label = "RL + refinement" if out.refined else "RL (this run)"
    rows = {label: out.predicted.step_time_s if out.predicted.ok else math.inf, **out.baselines}
    if out.refined:
        rows["RL alone"] = out.refined.policy_step_s
    console.print(f"simulated step time on the run's cluster (reference {out.reference_step_time_s * 1e3:.2f} ms):")
    for name, t in sorted(rows.items(), key=lambda kv: kv[1]):
        console.print(f"  {name:>14}: " + (f"{t * 1e3:.2f} ms (sim)" if math.isfinite(t) else "failed or OOM (sim)"))
    if out.measured is not None:
        measured = (f"{out.measured.step_time_s * 1e3:.2f} ms (engine, median)" if out.measured.ok
                    else f"failed ({out.measured.failure})")
        console.print(f"measured by the engine: RL (this run) {measured}; the baselines were not measured "
                      f"(`placer run` measures any placement file)")
    if out.failed_measurements:
        console.print(f"warning: {out.failed_measurements} engine measurement(s) failed during the run (see the "
                      f"warnings above; the reported placement is the best that measured)")
    if out.refined:
        console.print(f"refinement ({refine_s:g} s, {out.refined.evaluations} plans scored): {out.refined.source}; "
                      f"the plan: {out.predicted.plan_label}")
    elif refine_s > 0:
        console.print(f"refinement ({refine_s:g} s): nothing faster than the run's best")
    if out.kept_on_disk:
        console.print(f"note: {out.kept_on_disk}")
    console.print(f"run folder: {result.run_dir} (placement.json, learning_curve.png, TensorBoard events)")
