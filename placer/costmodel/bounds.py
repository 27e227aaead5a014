"""Lower bounds on the step time of any placement, and the efficiency of a result against them.

``lower_bound_s = max(critical path, work bound, colocation bound, fill and drain, memory x time)``, all on the best
device for every op and ignoring transfers, so no placement or schedule can beat it. The simulator's rules the
proofs use: a device runs its tasks one at a time, in its order; a forward of ``(op, m)`` waits for its
predecessors' forwards of micro-batch ``m``; a backward waits for its own forward and, for an op whose value depends
on a parameter (``needs_grad``), for the backward of every successor (a remote one through the gradient's transfer).
Backward times enter the chains below only for ``needs_grad`` ops (for the others the producer's backward does not
wait on a remote reader); they all still count as work.

* **critical path**: the longest chain of forward then backward times through the graph (forward along a path,
  backward back along it), each op at its fastest device's time. With ``M`` micro-batches one micro-batch's
  chain must still run end to end, so the per-micro-batch times of :meth:`placer.costmodel.sim.Simulator.microbatch_s`
  are used; with ``M = 1`` this is the usual full-batch critical path.
* **work bound**: for any weights ``lam_d >= 0`` summing to 1, ``T >= sum_i min_d lam_d w_i(d)`` where
  ``w_i(d) = M x per-micro-batch time`` of op ``i`` on device ``d`` (the LP dual of spreading all work over the
  devices). We take the best of ``lam`` uniform and ``lam_d`` proportional to device ``d``'s speed
  (``1 / its total work``); for devices of one kind that differ only in speed this is exactly
  ``total work / total speed``. With an ``optimizer``, ``w_i(d)`` also holds op ``i``'s share of its device's
  parameter update (``param bytes x touched / memory bandwidth``: the update streams every parameter of the
  device once, after its last backward, on that device).
* **colocation bound**: the ops of one colocation group share a device, which runs one task at a time, so for
  every group ``g``: ``T >= head_g + work_g + tail_g``. ``work_g`` is the group's forward+backward work on its
  best device; ``head_g`` the earliest any of its forwards can start (the longest forward chain into the op, over
  the group's ops, the smallest); ``tail_g`` the least backward work that must follow its last backward (an op's
  backward releases its inputs' backwards, so the longest backward chain through its predecessors, the smallest
  over the group's ops). It matters where one shared module carries much of the work: NMT's output projection,
  called once per decoder step, is ~43% of the graph's GPU time. Two more orders of the same tasks give two more
  terms, with ``down_i`` the longest chain from the end of ``i``'s forward to the start of its backward (forward
  to a sink and backward back to ``i``'s readers; 0 unless ``i`` is ``needs_grad``): no backward of ``g`` starts
  before ``min_i (head_i + f_i + down_i)``, after which all ``M`` backwards of every op of ``g`` run on its device,
  then ``tail_g``: ``T >= min_i(head_i + f_i + down_i) + M B_g + tail_g``; the last forward of ``g`` (op ``i``)
  ends at ``>= head_g + M F_g`` and its own micro-batch still needs ``down_i + b_i + tail_i``:
  ``T >= head_g + M F_g + min_i(down_i + b_i + tail_i)``. With an ``optimizer``, the group's device updates at
  least the group's parameters after its last backward: ``tail_g`` becomes ``max(tail_g, update_g)`` in the first
  two terms (``update_g`` = the group's parameter bytes x touched / the best memory bandwidth + one dispatch).
* **fill and drain** (Carlier's bound for parallel machines with heads and tails): a device's first task is a
  forward of some op ``i`` (a backward needs its own forward first), which starts no earlier than ``head_i``; its
  last forward or backward is a backward of some op ``j`` (every forward has its backward later on the same
  device), after which ``tail_j`` still has to run. Between the two it does all its work. Different devices have
  different first ops and different last ops (an op, and a colocation group, lives on one device), so over the
  ``U`` devices a plan uses, ``U T >= total work + the U smallest group heads + the U smallest group tails``:
  ``T >= min over U = 1..D of (W + H_U + Q_U) / U``, with ``W`` every op on its fastest device. It is the
  pipeline's fill and drain as far as the graph forces them on every placement (a device that holds only late
  ops idles until their inputs can exist), without assuming stages.
* **memory** (:func:`memory_fits`, with an ``optimizer``; :func:`placer.costmodel.plans.plan_lower_bound_s`
  drops the micro-batch counts that fail it): a device's peak is at least its parameters x (2 + optimizer state
  copies) plus every ``needs_grad`` op's per-micro-batch stash on it. Proof, for a graph with one sink (the loss;
  every op is then its ancestor): let ``(i, m)`` be the first backward of a ``needs_grad`` op in the device's
  order. It waits, through its successors' backwards, for the sink's backward of ``m``, hence for the forward of
  ``m`` of every op, so every forward of ``m`` on this device comes earlier in its order (else the order
  deadlocks), and no ``needs_grad`` stash on it has been freed yet. Summed over devices: if the parameters'
  states and one micro-batch of ``needs_grad`` stash exceed the total memory, every plan with that ``M`` is out
  of memory; likewise if one op's states, stash and temporaries (any graph) exceed the largest device.

* **memory x time** (with an ``optimizer``): a device's memory over the step, integrated over time, is at most
  ``T`` x (its capacity - its parameter states), because the simulator's peak is the largest level of its walk
  and the level between tasks is one of the walk's levels. The stash of ``(i, m)`` is on that device from the
  start of its forward until its backward starts, at least ``f_i + down_i`` (its own forward, then the chain to
  its backward); summed over ops, micro-batches and devices:
  ``T >= sum_i stash_i (f_i + down_i) / (total memory - total parameter states)`` (``stash_i`` the op's stash for
  the whole batch, its times per micro-batch on the fastest device). It binds where memory is tight: a plan must
  then keep little in flight, and the stash that is held cannot be held for less than the chain it waits for.

* **activation recomputation** (``recompute=True``, the default: :func:`placer.costmodel.plans.best_plan` may
  recompute on the devices over memory). A recomputing device keeps only its segments' inputs and runs each
  segment's forward again before its backward: work only grows, so the critical path, work, colocation and
  fill-and-drain terms hold as they are, but a stash need no longer be held. The summed memory argument then
  keeps only the parameter states (one op's own stash still comes back for its backward: the one-op argument
  holds), and the memory x time term becomes a trade: op ``i`` either holds its stash (``stash_i (f_i +
  down_i)`` of memory x time) or pays its forward again (``M f_i`` more work, weighted as in the work bound), so
  ``T >= min over x in [0, 1]^n of max(work + sum x_i redo_i, sum (1 - x_i) hold_i / free)``: a fractional
  knapsack, solved exactly by recomputing the ops with the most memory x time per second of forward first. With
  ``recompute=False`` the terms are those above, for plans that keep every stash.

The parameter update is left out unless an ``optimizer`` is given (it only adds), so the bound without one stays
valid for every optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from graphs.grouping import colocation_index
from placer.costmodel.sim import OPTIMIZERS, Simulator, get_simulator

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.result import StepResult

CostKind = str | Mapping[str, str] | None
Overhead = float | Mapping[str, float] | None


def _per_device_times(sim: Simulator, microbatches: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fwd, bwd)`` per-micro-batch times, shape ``(D, n)``."""
    return sim.microbatch_s(microbatches)


def _chains(sim: Simulator, f_min: np.ndarray, b_min: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per op ``(head, tail, down)``: the longest forward chain into it, the longest backward chain through its
    predecessors after its backward, the longest chain from its forward's end to its backward's start (module
    docstring); backward times count only for ``needs_grad`` ops."""
    n = sim.graph.n
    b_chain = np.where(sim.needs_grad, b_min, 0.0)
    head, tail, down = np.zeros(n), np.zeros(n), np.zeros(n)
    src, dst = sim.graph.edge_index
    order = np.argsort(dst, kind="stable")  # dst ascending is a valid order since src < dst
    for e in order:
        i, j = src[e], dst[e]
        head[j] = max(head[j], head[i] + f_min[i])
        tail[j] = max(tail[j], tail[i] + b_chain[i])
    for e in order[::-1]:  # consumers before producers
        i, j = src[e], dst[e]
        if sim.needs_grad[i]:
            down[i] = max(down[i], f_min[j] + down[j] + b_chain[j])
    return head, tail, down


def _fastest(graph: "OpGraph", cluster: "Cluster", microbatches: int, cost_kind: CostKind,
             dispatch_overhead_s: Overhead) -> tuple[Simulator, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                     tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """What the bounds share: the simulator, per-device ``(fwd, bwd)`` per-micro-batch times ``(D, n)``, each op's
    fastest ``fwd`` and ``bwd`` and its :func:`_chains` on those."""
    sim = get_simulator(graph, cluster, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    f, b = _per_device_times(sim, microbatches)
    f_min, b_min = f.min(axis=0), b.min(axis=0)
    return sim, f, b, f_min, b_min, _chains(sim, f_min, b_min)


def _group_min(group: np.ndarray, g_num: int, x: np.ndarray) -> np.ndarray:
    """Per group, the smallest ``x`` of its ops."""
    out = np.full(g_num, np.inf)
    np.minimum.at(out, group, x)
    return out


def _update_s(sim: Simulator, optimizer: str | None) -> np.ndarray:
    """``(D, n)``: op ``i``'s parameters' share of device ``d``'s update (0 without an optimizer)."""
    if optimizer is None:
        return np.zeros_like(sim.fwd_s)
    return OPTIMIZERS[optimizer].touched * sim.param_bytes[None, :] / sim.mem_bw_Bps[:, None]


def critical_path_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                    cost_kind: CostKind = None, dispatch_overhead_s: Overhead = None) -> float:
    """Longest forward+backward chain of one micro-batch, each op on its fastest device, no transfers (seconds)."""
    if not graph.n:
        return 0.0
    sim, _, _, f_min, b_min, (head, tail, down) = _fastest(graph, cluster, microbatches, cost_kind,
                                                         dispatch_overhead_s)
    return float((head + f_min + down + np.where(sim.needs_grad, b_min, 0.0) + tail).max())


def _work_lams(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two device weightings of the work bound: uniform, and proportional to each device's speed."""
    d = work.shape[0]
    inv = 1.0 / np.maximum(work.sum(axis=1), 1e-300)
    return np.full(d, 1.0 / d), inv / inv.sum()


def work_bound_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                 cost_kind: CostKind = None, dispatch_overhead_s: Overhead = None,
                 optimizer: str | None = None) -> float:
    """All the work (and, with an ``optimizer``, the updates) spread perfectly over the devices (seconds); see the
    module docstring."""
    sim = get_simulator(graph, cluster, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    f, b = _per_device_times(sim, microbatches)
    work = microbatches * (f + b) + _update_s(sim, optimizer)  # (D, n)
    return max(float((lam[:, None] * work).min(axis=0).sum()) for lam in _work_lams(work))


def colocation_bound_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                       cost_kind: CostKind = None, dispatch_overhead_s: Overhead = None,
                       optimizer: str | None = None) -> float:
    """``max_g`` of the three colocation terms of the module docstring over the groups (seconds)."""
    if not graph.n:
        return 0.0
    m = microbatches
    sim, f, b, f_min, b_min, (head, tail, down) = _fastest(graph, cluster, m, cost_kind, dispatch_overhead_s)
    b_chain = np.where(sim.needs_grad, b_min, 0.0)
    group, g_num = colocation_index(graph)
    fw, bw = np.zeros((g_num, f.shape[0])), np.zeros((g_num, f.shape[0]))
    np.add.at(fw, group, m * f.T)
    np.add.at(bw, group, m * b.T)

    def group_min(x: np.ndarray) -> np.ndarray:
        return _group_min(group, g_num, x)

    head_g, tail_g = group_min(head), group_min(tail)
    after = tail_g
    if optimizer is not None:
        params = np.bincount(group, weights=sim.param_bytes, minlength=g_num)
        upd = np.where(params > 0, (OPTIMIZERS[optimizer].touched * params[:, None] / sim.mem_bw_Bps[None, :]
                                    + sim.overhead_s[None, :]).min(axis=1), 0.0)
        after = np.maximum(tail_g, upd)
    terms = (head_g + (fw + bw).min(axis=1) + after,
             group_min(head + f_min + down) + bw.min(axis=1) + after,
             head_g + fw.min(axis=1) + group_min(down + b_chain + tail))
    return float(np.max(terms))


def fill_drain_bound_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                       cost_kind: CostKind = None, dispatch_overhead_s: Overhead = None) -> float:
    """``min over U of (work + U smallest group heads + U smallest group tails) / U`` (seconds); see the module
    docstring."""
    if not graph.n:
        return 0.0
    _, f, b, _, _, (head, tail, _) = _fastest(graph, cluster, microbatches, cost_kind, dispatch_overhead_s)
    group, g_num = colocation_index(graph)
    head_g, tail_g = _group_min(group, g_num, head), _group_min(group, g_num, tail)
    work = float((microbatches * (f + b)).min(axis=0).sum())
    u_max = min(cluster.num_devices, head_g.size)
    u = np.arange(1, u_max + 1)
    return float(((work + np.cumsum(np.sort(head_g))[:u_max] + np.cumsum(np.sort(tail_g))[:u_max]) / u).min())


def memory_fits(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1, optimizer: str = "adam",
                cost_kind: CostKind = None, recompute: bool = True) -> bool:
    """False when no plan with ``microbatches`` can fit in memory (the memory argument of the module docstring;
    with ``recompute`` plans may recompute activations, so only the parameter states must fit); True says only
    that this argument excludes nothing."""
    if not graph.n:
        return True
    sim = get_simulator(graph, cluster, cost_kind=cost_kind)
    m = microbatches
    static = sim.param_bytes * (2 + OPTIMIZERS[optimizer].state_copies)
    if float((static + (sim.stash_bytes + sim.temp_bytes) / m).max()) > float(sim.memory_bytes.max()):
        return False  # one op alone does not fit on the largest device (recomputed, its stash is back for its backward)
    sinks = np.setdiff1d(np.arange(graph.n), graph.edge_index[0])
    if sinks.size != 1:
        return True  # the summed argument needs one sink (the loss)
    held = static + (0.0 if recompute else np.where(sim.needs_grad, sim.stash_bytes, 0.0) / m)
    return float(held.sum()) <= float(sim.memory_bytes.sum())


def memory_time_bound_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1, optimizer: str = "adam",
                        cost_kind: CostKind = None, dispatch_overhead_s: Overhead = None,
                        recompute: bool = True) -> float:
    """Stashed bytes x the least time each is held, over the memory the parameter states leave (seconds; module
    docstring); ``inf`` when the states alone fill the cluster's memory and some stash must be held. With
    ``recompute``, the least over how much of each op's stash is recomputed instead, each recomputed forward
    added to the work bound (:func:`_recompute_tradeoff_s`)."""
    sim, f, b, f_min, _, (_, _, down) = _fastest(graph, cluster, microbatches, cost_kind, dispatch_overhead_s)
    free = float(sim.memory_bytes.sum() - (sim.param_bytes * (2 + OPTIMIZERS[optimizer].state_copies)).sum())
    held = sim.stash_bytes * (f_min + down)
    if float(held.sum()) == 0.0:
        return 0.0
    if free <= 0:
        return float("inf")
    if not recompute:
        return float(held.sum()) / free
    work = microbatches * (f + b) + _update_s(sim, optimizer)
    return max(_recompute_tradeoff_s((lam[:, None] * work).min(axis=0).sum(),
                                     (lam[:, None] * microbatches * f).min(axis=0), held / free)
               for lam in _work_lams(work))


def _recompute_tradeoff_s(work_s: float, redo_s: np.ndarray, hold_s: np.ndarray) -> float:
    """``min over x in [0, 1]^n of max(work_s + sum x_i redo_s_i, sum (1 - x_i) hold_s_i)``: op ``i`` either
    keeps its stash (``hold_s_i`` of the memory x time term) or recomputes its forward (``redo_s_i`` more work;
    its stash is then held for no less than 0). Fractional knapsack: recompute the ops that free the most
    memory x time per second of work first, until the two sides meet."""
    hold = float(hold_s.sum())
    if hold <= work_s:
        return work_s
    order = np.lexsort((-hold_s, -(hold_s / np.maximum(redo_s, 1e-300))))
    r, h = redo_s[order], hold_s[order]
    work_k = work_s + np.concatenate(([0.0], np.cumsum(r)))   # after recomputing the first k ops
    hold_k = hold - np.concatenate(([0.0], np.cumsum(h)))
    k = int(np.argmax(work_k >= hold_k))  # the first point where work has caught up (k = n at the latest)
    # between k - 1 and k, x of op k - 1 moves from 0 to 1: both sides are linear in x
    gap_w, gap_h = work_k[k] - work_k[k - 1], hold_k[k - 1] - hold_k[k]
    x = (hold_k[k - 1] - work_k[k - 1]) / max(gap_w + gap_h, 1e-300)
    return float(work_k[k - 1] + x * gap_w)


def bound_terms_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1, cost_kind: CostKind = None,
                  dispatch_overhead_s: Overhead = None, optimizer: str | None = None,
                  recompute: bool = True) -> dict[str, float]:
    """Each term of :func:`lower_bound_s` by name (seconds): which one binds, and by how much."""
    kw = dict(microbatches=microbatches, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    terms = {"critical path": critical_path_s(graph, cluster, **kw),
             "work": work_bound_s(graph, cluster, optimizer=optimizer, **kw),
             "colocation": colocation_bound_s(graph, cluster, optimizer=optimizer, **kw),
             "fill and drain": fill_drain_bound_s(graph, cluster, **kw)}
    if optimizer is not None and graph.n:
        terms["memory x time"] = memory_time_bound_s(graph, cluster, optimizer=optimizer, recompute=recompute, **kw)
    return terms


def lower_bound_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                  cost_kind: CostKind = None, dispatch_overhead_s: Overhead = None,
                  optimizer: str | None = None, recompute: bool = True) -> float:
    """The largest of :func:`bound_terms_s`: no placement is faster. With an ``optimizer`` the updates and the
    memory x time term count too (module docstring); memory is :func:`memory_fits`'s. ``recompute``: over plans
    that may recompute activations (else over plans that do not)."""
    return max(bound_terms_s(graph, cluster, microbatches=microbatches, cost_kind=cost_kind,
                             dispatch_overhead_s=dispatch_overhead_s, optimizer=optimizer,
                             recompute=recompute).values())


def efficiency(result: "StepResult", graph: "OpGraph", cluster: "Cluster", *,
               cost_kind: CostKind = None, dispatch_overhead_s: Overhead = None) -> float:
    """``lower_bound / step_time`` in (0, 1] (0 for a failed step); 1 means no placement could be faster."""
    if not result.ok or result.step_time_s <= 0:
        return 0.0
    lb = lower_bound_s(graph, cluster, microbatches=result.microbatches, cost_kind=cost_kind,
                       dispatch_overhead_s=dispatch_overhead_s)
    return lb / result.step_time_s
