"""``checkpoint.pt``: one format for runs on one graph or many, the global RNGs, and the formats written before.

Version 3 (this one)::

    {"version": 3, "policy": state_dict, "rng": {"torch", "numpy", "python"},
     "counters": {"updates", "samples", "elapsed_s"},
     "graphs": [{"name", "algo": algorithm state, "best": {"device_of_group", "step_time_s"}, "history": [...],
                 "callbacks": {callback name: its state}}, ...]}   # in the run's graph order

:func:`load_checkpoint` also reads version 1 (one-graph runs: ``algo``, ``best`` with the measured placement,
``history``, ``real``) and version 2 (multi-graph runs: ``algos``, ``best`` / ``best_groups`` by graph name,
``rounds``) and turns them into version 3.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from placer.app.runs import save_torch_atomic

VERSION = 3


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (before the policy is initialised)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states :func:`seed_everything` seeds."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (a version-2 checkpoint has no ``python`` state: left as seeded)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])


def save_checkpoint(path: Path, *, policy: dict[str, Any], counters: dict[str, Any],
                    graphs: list[dict[str, Any]]) -> None:
    """Write a version-3 checkpoint atomically (module docstring)."""
    save_torch_atomic({"version": VERSION, "policy": policy, "rng": rng_state(), "counters": counters,
                       "graphs": graphs}, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load`` of a run's checkpoint; a one-line ``ValueError`` naming the file when it is not one (empty,
    truncated, another pickle)."""
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # EOFError, UnpicklingError, RuntimeError (a truncated zip), ...: all mean "not readable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a placer checkpoint (it holds a {type(state).__name__})")
    return state


def load_checkpoint(path: Path, graph_names: list[str]) -> dict[str, Any]:
    """A checkpoint of any version as version 3, its graphs in the order of ``graph_names`` (the run's); a
    one-line ``ValueError`` when it cannot continue this run."""
    state = read_checkpoint(path)
    version = state.get("version")
    if version == 1:
        state = _from_v1(state, graph_names)
    elif version == 2:
        state = _from_v2(state, graph_names, run=path.parent.name)
    elif version != VERSION:
        raise ValueError(f"{path.parent.name}: checkpoint version {version!r} is not one this placer reads "
                         f"(1, 2 or {VERSION})")
    names = [g["name"] for g in state["graphs"]]
    if names != list(graph_names):
        raise ValueError(f"{path.parent.name}: its checkpoint holds graphs {', '.join(names)}, not "
                         f"{', '.join(graph_names)}")
    return state


def _from_v1(state: dict[str, Any], graph_names: list[str]) -> dict[str, Any]:
    """A one-graph checkpoint of the first trainer."""
    if len(graph_names) != 1:
        raise ValueError(f"a version-1 checkpoint holds one graph, this run has {len(graph_names)}")
    best = state["best"]
    remeasure = {"measured": best.get("measured"), "measured_device_of_group": best.get("measured_device_of_group"),
                 "log": state.get("real", [])}
    return {"version": VERSION, "policy": state["policy"], "rng": state["rng"], "counters": state["counters"],
            "graphs": [{"name": graph_names[0], "algo": state["algo"],
                        "best": {"device_of_group": best["device_of_group"], "step_time_s": best["step_time_s"]},
                        "history": state.get("history", []), "callbacks": {"remeasure": remeasure}}]}


def _from_v2(state: dict[str, Any], graph_names: list[str], *, run: str) -> dict[str, Any]:
    """A multi-graph checkpoint of the first multi-graph trainer."""
    if "algos" not in state:
        raise ValueError(f"{run}: its checkpoint predates resumable multi-graph runs")
    if len(state["algos"]) != len(graph_names):
        raise ValueError(f"{run}: its checkpoint holds {len(state['algos'])} graphs, this run has "
                         f"{len(graph_names)}")
    graphs = [{"name": name, "algo": algo,
               "best": {"device_of_group": state["best_groups"].get(name), "step_time_s": state["best"][name]},
               "history": [], "callbacks": {}} for name, algo in zip(graph_names, state["algos"])]
    counters = {"updates": state["rounds"], "samples": state["samples"], "elapsed_s": state["elapsed_s"]}
    return {"version": VERSION, "policy": state["policy"], "rng": state["rng"], "counters": counters,
            "graphs": graphs}
