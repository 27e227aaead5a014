"""Roofline estimates of op costs on GPUs that are not present (labelled ``estimated``).

Williams, Waterman & Patterson, "Roofline: an insightful visual performance model for multicore architectures"
(CACM 2009): an op is bound either by arithmetic or by memory traffic. Per op, on GPU ``g``::

    fwd_s = launch_s + max(flops / (peak_flops * eff), bytes_touched / (bandwidth * eff))
    bwd_s = 2 * launch_s + max(2 * flops / (peak_flops * eff), 2 * bytes_touched / (bandwidth * eff))

``bytes_touched`` = input bytes (sum of incoming edge bytes) + output bytes + the bytes of the parameters the
op reads (every call of a shared module reads its weights, although ``param_bytes`` counts them once); the
backward of a matmul-like op is two matmuls of the forward's size (input and weight gradients), hence 2×.
``flops`` come from profiling (:func:`graphs.profile.profile` fills them with ``FlopCounterMode``); on an
unprofiled graph (all FLOPs 0) the estimate is bandwidth-only and a warning is logged.

**Anchored on a measurement.** Where the graph also has a cost set *measured* on a GPU of the same software era
(compute capability 7.5 or newer: the CUDA 13 builds the measured sets come from dropped Volta and older), the
estimate for such a GPU ``g`` starts from the measured set of GPU ``r`` and adds only the roofline's difference::

    fwd_s(g) = measured fwd_s(r) + roofline fwd_s(g) - roofline fwd_s(r)       (likewise bwd_s)

The measurement carries what the roofline does not see (PyTorch's per-op dispatch, kernels below their peak: the
measured H100 sets of the ColocRL graphs are 2-7x their roofline) and the datasheets carry the difference between
the cards. Without it a measured H100 next to a plain roofline A100 made the A100 the faster card for 71% of
inception's ops and 96% of NMT's, which no datasheet supports. K80 and V100 estimates stay plain roofline (the era
of ColocRL's table, whose TensorFlow overheads their ``launch_s`` models).

Zero-cost ops (``input``, ``get_attr``, ``getitem``, shape queries and pure views) cost 0: they launch no
kernel. An op gets no backward when a measured cost set says its backward is 0 (no gradient flows through it),
or when its kind never has one (the zero-cost kinds). Fp32 throughput without tensor cores is used because the
models train in fp32 and PyTorch leaves TF32 matmuls off by default.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from graphs.ir import OpCosts, OpGraph, Provenance

log = logging.getLogger(__name__)

__all__ = ["GpuSpec", "GPUS", "estimate", "with_estimates", "ZERO_COST_KINDS"]

GiB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """Peak rates of one GPU, from its datasheet, plus an achievable fraction."""

    name: str
    """Short name, also the cost-set key (``K80``...)."""
    peak_flops: float
    """Peak fp32 FLOP/s (boost clock, no tensor cores)."""
    bandwidth_Bps: float
    """Peak device-memory bandwidth, bytes/s."""
    launch_s: float
    """Per-kernel launch and framework overhead, seconds."""
    efficiency: float
    """Fraction of both peaks that real kernels reach (an assumption, not a datasheet number)."""
    memory_bytes: int
    """Device memory, bytes."""
    compute_capability: float
    """CUDA compute capability (datasheet); 7.5 and newer run the CUDA 13 stack the measured sets come from."""

    @property
    def anchorable(self) -> bool:
        """Whether a measured set of another such GPU anchors this GPU's estimate (module docstring)."""
        return self.compute_capability >= 7.5


GPUS: dict[str, GpuSpec] = {
    # Tesla K80 datasheet (NVIDIA, 2014): 2 × GK210, 8.73 TFLOP/s fp32 with GPU Boost, 480 GB/s, 24 GB GDDR5 for
    # the board. ColocRL's "GPU" is one GK210 die: half of each. Kepler-era launch + TF op overhead ~10 us.
    "K80": GpuSpec(name="K80", peak_flops=4.37e12, bandwidth_Bps=240e9, launch_s=10e-6, efficiency=0.5,
                   memory_bytes=12 * GiB, compute_capability=3.7),
    # Tesla V100 SXM2 datasheet (NVIDIA, 2017): 15.7 TFLOP/s fp32, 900 GB/s HBM2, 16/32 GB.
    "V100": GpuSpec(name="V100", peak_flops=15.7e12, bandwidth_Bps=900e9, launch_s=5e-6, efficiency=0.7,
                    memory_bytes=32 * GiB, compute_capability=7.0),
    # A100 80GB SXM4 datasheet (NVIDIA, 2021): 19.5 TFLOP/s fp32 (156 TF32 with tensor cores, unused), 2,039 GB/s.
    "A100": GpuSpec(name="A100", peak_flops=19.5e12, bandwidth_Bps=2039e9, launch_s=4e-6, efficiency=0.7,
                    memory_bytes=80 * GiB, compute_capability=8.0),
    # H100 SXM5 datasheet (NVIDIA, 2023): 67 TFLOP/s fp32, 3.35 TB/s HBM3, 80 GB.
    "H100": GpuSpec(name="H100", peak_flops=67e12, bandwidth_Bps=3.35e12, launch_s=4e-6, efficiency=0.6,
                    memory_bytes=80 * GiB, compute_capability=9.0),
    # H200 SXM datasheet (NVIDIA, 2024): the H100's compute (67 TFLOP/s fp32) with 4.8 TB/s HBM3e, 141 GB.
    "H200": GpuSpec(name="H200", peak_flops=67e12, bandwidth_Bps=4.8e12, launch_s=4e-6, efficiency=0.6,
                    memory_bytes=140 * GiB, compute_capability=9.0),
}

ZERO_COST_KINDS = frozenset({
    "input", "get_attr", "getitem", "getattr", "size", "dim", "numel", "view", "reshape", "flatten", "unflatten",
    "squeeze", "unsqueeze", "transpose", "permute", "t", "expand", "expand_as", "view_as", "detach", "alias",
    "unbind", "split", "chunk", "select", "slice", "_unsafe_view", "sym_size",
})
"""Op kinds that launch no kernel (metadata only)."""


def _param_read_bytes(graph: OpGraph) -> np.ndarray:
    """Parameter bytes each op reads: every call of a module reads the weights counted at its first call."""
    per_module: dict[tuple[str, str], int] = {}
    for kind, path, nbytes in zip(graph.op_kinds, graph.module_paths, graph.param_bytes):
        if nbytes > 0 and kind != "get_attr":
            per_module[(kind, path)] = max(per_module.get((kind, path), 0), int(nbytes))
    return np.array([per_module.get((k, p), 0) if k != "get_attr" else 0
                     for k, p in zip(graph.op_kinds, graph.module_paths)], dtype=np.float64)


def _roofline_s(graph: OpGraph, spec: GpuSpec) -> tuple[np.ndarray, np.ndarray]:
    """Plain roofline forward and backward times of every op on ``spec`` (zero-cost kinds 0)."""
    in_bytes = np.zeros(graph.n)
    np.add.at(in_bytes, graph.edge_index[1], graph.edge_bytes.astype(np.float64))
    touched = in_bytes + graph.out_bytes + _param_read_bytes(graph)
    kernel_s = np.maximum(graph.flops / (spec.peak_flops * spec.efficiency),
                          touched / (spec.bandwidth_Bps * spec.efficiency))
    free = np.array([k in ZERO_COST_KINDS for k in graph.op_kinds], dtype=bool)
    return (np.where(free, 0.0, spec.launch_s + kernel_s), np.where(free, 0.0, 2 * spec.launch_s + 2 * kernel_s))


def _anchor(graph: OpGraph, spec: GpuSpec) -> str | None:
    """The measured GPU cost set that anchors ``spec``'s estimate (the first by name), or None."""
    if not spec.anchorable:
        return None
    refs = sorted(k for k, c in graph.costs.items()
                  if c.provenance.method == "measured" and k in GPUS and GPUS[k].anchorable and k != spec.name)
    return refs[0] if refs else None


def estimate(graph: OpGraph, gpu: str) -> OpCosts:
    """Forward/backward times of every op of ``graph`` on ``gpu`` (a key of :data:`GPUS`): the roofline, anchored
    on a measured set of a GPU of the same era where the graph has one (module docstring)."""
    try:
        spec = GPUS[gpu]
    except KeyError:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)}") from None
    if graph.n and not graph.flops.any():
        log.warning("graph %s has no FLOPs (not profiled): the %s estimate is bandwidth-only", graph.name, gpu)
    fwd, bwd = _roofline_s(graph, spec)
    note = (f"roofline: peak {spec.peak_flops / 1e12:.2f} TFLOP/s fp32, {spec.bandwidth_Bps / 1e9:.0f} GB/s, "
            f"efficiency {spec.efficiency}, launch {spec.launch_s * 1e6:.0f} us; backward = 2x forward")
    ref = _anchor(graph, spec)
    if ref is not None:  # the measured set also says which ops cost something and which get a gradient
        measured, (ref_fwd, ref_bwd) = graph.costs[ref], _roofline_s(graph, GPUS[ref])
        fwd = np.maximum(measured.fwd_s + fwd - ref_fwd, 0.0)
        bwd = np.where(measured.bwd_s == 0, 0.0, np.maximum(measured.bwd_s + bwd - ref_bwd, 0.0))
        note = f"measured {ref} set + this roofline - the {ref} roofline; {note}"
    else:
        no_grad = np.array([k in ZERO_COST_KINDS for k in graph.op_kinds], dtype=bool)
        measured_sets = [c for c in graph.costs.values() if c.provenance.method == "measured"]
        if measured_sets:
            no_grad |= measured_sets[0].bwd_s == 0
        bwd[no_grad] = 0.0
    prov = Provenance(device=spec.name, threads=0, torch_version=torch.__version__,
                      date=datetime.date.today().isoformat(), method="estimated", note=note)
    return OpCosts(fwd_s=fwd, bwd_s=bwd, provenance=prov)


def with_estimates(graph: OpGraph, gpus: Sequence[str] = ("K80", "V100", "A100", "H100", "H200")) -> OpGraph:
    """``graph`` plus one estimated cost set per GPU, keyed by the GPU's name; a cost set measured on that GPU
    is kept, not replaced by an estimate."""
    measured = {k for k, c in graph.costs.items() if c.provenance.method == "measured"}
    return graph.replace(costs={**graph.costs, **{g: estimate(graph, g) for g in gpus if g not in measured}})
