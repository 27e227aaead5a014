"""Op graphs: the IR, the benchmark models, tracing, profiling and grouping."""

from graphs.ir import OpCosts, OpGraph, Provenance

__all__ = ["OpGraph", "OpCosts", "Provenance"]
