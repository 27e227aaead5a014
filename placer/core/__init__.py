"""Core types every layer shares: :class:`~placer.core.cluster.Cluster` (devices, links, presets),
:class:`~placer.core.placement.Placement` (one device per op) and :class:`~placer.core.result.StepResult` (what the
simulator and the engine both return)."""
