"""Loaders for trainers: put a placement JSON (``placer.placement/v1``) to work on a real ``nn.Module``.

Two ways, matching the two ways a placement can be trained (see ARCHITECTURE.md, "Placement JSON"):

* :func:`apply` — **single-process model parallelism**, as ColocRL's placements were run (Mirhoseini et al.,
  ICML 2017): each module listed under ``modules`` moves to its device with its parameters, and a forward
  pre-hook moves the module's tensor inputs to that device. ``Tensor.to`` is differentiable, so gradients
  cross devices back the same way. Only *module* placement is applied: functional ops between modules (adds,
  cats, getitems) run wherever their inputs are. The per-op ``ops`` mapping is for placer's own engine.
* :func:`pipeline_stages` — **pipeline parallelism** with ``torch.distributed.pipelining`` (GPipe, Huang et al.
  2019; 1F1B, Narayanan et al. 2021): the traced fx graph of the step is cut at the ``stages`` boundaries with
  ``torch.fx.passes.split_module``, and rank ``r`` gets a ``PipelineStage`` running stage ``r``. A pipeline stage
  can only receive the previous stage's outputs, so every value a later stage needs (the integer targets,
  activations skipping a stage, each tensor of a tuple such as ``LSTMCell``'s ``(h, c)``) is handed on through
  the stages in between. Model inputs all enter at stage 0, as a data loader feeds the first stage. The last
  stage returns the step's scalar loss; :func:`pipeline_schedule` pairs it with an identity ``loss_fn``.

Limits: every rank builds the whole model and keeps only its stage's modules busy; a parameter used by two
stages (an ``nn.Module`` called on both sides of a cut) would get two unsynchronised copies, so
:func:`pipeline_stages` refuses it — placer's colocation rule (all calls of a module on one device) never makes
such a placement. Python values that are not tensors (e.g. ``x.size(0)``) cannot be sent between stages; they
are fixed at their value for one micro-batch of ``example_inputs``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only, tree_unflatten

from graphs.trace import TracedModel, buffers_restored, record_values, trace_model
from placer.io.document import LoadedPlacement, load_placement, placement_from_document

if TYPE_CHECKING:  # imported lazily at run time: torch.distributed is only needed by pipeline users
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

log = logging.getLogger(__name__)

__all__ = ["apply", "placed_devices", "resolve_device", "StageModule", "stage_modules", "pipeline_stages",
           "pipeline_schedule", "pipeline_loss"]

PlacementLike = Mapping[str, Any] | str | os.PathLike
"""A placement document (dict), a path to a placement JSON, or a ``LoadedPlacement``."""


# ---------------------------------------------------------------------------------------------- documents


def _document(placement: Any) -> dict[str, Any]:
    """The validated placement document from a dict, a path or a ``LoadedPlacement``."""

    if isinstance(placement, LoadedPlacement):
        return placement.doc
    if isinstance(placement, (str, os.PathLike)):
        return load_placement(placement).doc
    if isinstance(placement, Mapping):
        return placement_from_document(dict(placement)).doc
    raise ValueError(f"placement must be a placement JSON path or document, got {type(placement).__name__}")


def resolve_device(name: str, device_map: Mapping[str, Any] | None = None) -> torch.device:
    """The ``torch.device`` for a placement device name, after ``device_map``; one-line ``ValueError`` if absent.

    ``cpu:N`` is legal (``torch.device("cpu:1")`` computes on the CPU). A device is accepted only when a tensor
    can be made on it here, so ``cuda:3`` on a machine without 4 GPUs fails with a hint to pass ``device_map``.
    """
    target = (device_map or {}).get(name, name)
    hint = f"map it to a device of this machine with device_map, e.g. {{{name!r}: 'cpu'}}"
    try:
        device = target if isinstance(target, torch.device) else torch.device(str(target))
    except (RuntimeError, ValueError):
        raise ValueError(f"placement device {name!r} -> {str(target)!r} is not a torch device name; {hint}") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"placement device {name!r} ({device}) does not exist here ({why}); {hint}") from None
    return device


def _check_device_map(doc: Mapping[str, Any], device_map: Mapping[str, Any] | None) -> None:
    unknown = sorted(set(device_map or {}) - set(doc["devices"]))
    if unknown:
        raise ValueError(f"device_map names {unknown[0]!r}, which is not a device of the placement "
                         f"(devices: {', '.join(doc['devices'])})")


# ---------------------------------------------------------------------------------------------- apply


class _MoveInputs:
    """Forward pre-hook: move every tensor argument of the module to ``device`` (differentiably)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tree_map_only(torch.Tensor, lambda t: t.to(self.device), (args, kwargs))


def _remove_hooks(model: nn.Module) -> None:
    """Drop the hooks of an earlier :func:`apply`, so applying twice replaces rather than stacks."""
    for mod in model.modules():
        for key, hook in list(mod._forward_pre_hooks.items()):
            if isinstance(hook, _MoveInputs):
                del mod._forward_pre_hooks[key]
                mod._forward_pre_hooks_with_kwargs.pop(key, None)


def apply(model: nn.Module, placement: PlacementLike, *, device_map: Mapping[str, Any] | None = None) -> nn.Module:
    """Place ``model``'s submodules on their devices (single-process model parallel); returns ``model``.

    ``placement``: a placement JSON path or document. ``device_map``: placement device name → device here
    (``{"cpu:1": "cpu"}``, ``{"gpu:0": "cuda:0"}``); names not in it are used as they are. Each module in the
    placement's ``modules`` moves (parameters and buffers) to its device, parents before children so a child's
    own entry wins, and gets a forward pre-hook moving its tensor inputs there. Functional ops between modules
    run where their inputs are. Raises a one-line ``ValueError`` for a module path the model lacks or a device
    this machine lacks. The model is modified in place.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply needs an nn.Module, got {type(model).__name__}")
    doc = _document(placement)
    _check_device_map(doc, device_map)
    modules: dict[str, int] = dict(doc["modules"])
    targets: list[tuple[str, nn.Module]] = []
    for path in sorted(modules, key=lambda p: (p.count(".") + bool(p), p)):  # parents first
        try:
            targets.append((path, model.get_submodule(path)))
        except AttributeError:
            missing = [p for p in modules if not _has_submodule(model, p)]
            raise ValueError(f"placement module {path!r} is not in model {type(model).__name__} "
                             f"({len(missing)} unknown module paths; placement made for graph "
                             f"{doc['graph']['name']!r})") from None
    devices = {i: resolve_device(doc["devices"][i], device_map) for i in sorted(set(modules.values()))}
    if not modules:
        log.warning("placement for %s lists no modules; nothing to place", doc["graph"]["name"])
    _remove_hooks(model)
    for path, mod in targets:
        device = devices[modules[path]]
        mod.to(device)
        mod.register_forward_pre_hook(_MoveInputs(device), with_kwargs=True)
    log.info("placed %d modules of %s on %s", len(targets), type(model).__name__,
             ", ".join(sorted({str(d) for d in devices.values()})))
    return model


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def placed_devices(model: nn.Module) -> dict[str, torch.device]:
    """Module path → device, for the modules :func:`apply` placed (read back from their hooks)."""
    out: dict[str, torch.device] = {}
    for path, mod in model.named_modules():
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, _MoveInputs):
                out[path] = hook.device
    return out


# ---------------------------------------------------------------------------------------------- stages

_SUBMOD_RE = re.compile(r"^submod_(\d+)$")


class StageModule(nn.Module):
    """Pipeline stage ``index`` of a split step: ``forward(*tensors)`` → the next stage's tensors, or the loss.

    Stage 0 takes the model's inputs; stage ``s > 0`` takes the tensors stage ``s - 1`` returned. The partition
    ``split_module`` made for this stage (if the stage computes anything) is registered as ``part``, so
    ``parameters()`` are exactly this stage's parameters (plus any parameter read by ``get_attr``).
    """

    def __init__(self, *, index: int, num_stages: int, nodes: list[fx.Node], part: nn.Module | None,
                 attrs: Mapping[str, Any], inputs: list[str], carried_in: list[str], carried_out: list[str],
                 layouts: Mapping[str, tuple[Any, list[Any], list[bool]]], loss_arg: Any,
                 example_in: tuple[torch.Tensor, ...] = (), example_out: Any = (),
                 param_names: Mapping[int, str] | None = None, origins: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.index = index
        self.num_stages = num_stages
        if part is not None:
            self.part = part
        self._nodes = nodes
        # Tensors read by get_attr at the top level of the split (torch.export graphs read parameters so):
        # registered here, so a stage's parameters() include them and .to(device) moves them.
        self.attrs = nn.ParameterDict()
        self._attr_keys: dict[str, str] = {}
        self._attr_consts: dict[str, Any] = {}
        for k, (target, value) in enumerate(attrs.items()):
            key = f"attr_{k}"
            if isinstance(value, nn.Parameter):
                self.attrs[key] = value
            elif isinstance(value, torch.Tensor):
                self.register_buffer(key, value)
            else:
                self._attr_consts[target] = value
                continue
            self._attr_keys[target] = key
        self._inputs = inputs
        self._carried_in = carried_in
        self._carried_out = carried_out
        self._layouts = layouts
        self._loss_arg = loss_arg
        self.example_in = example_in
        """This stage's inputs for one micro-batch of the example (detached), for PipelineStage's static shapes."""
        self.example_out = example_out
        """This stage's outputs for the same micro-batch (a tuple of tensors, or the loss)."""
        origins = origins or {}
        self.param_names = dict(param_names or {})
        """``id(parameter)`` → its name in the user's model, for messages."""
        self._consts_in = next((f"{origins.get(name, name)} = {c!r}" for name in carried_in
                                for c, t in zip(layouts[name][1], layouts[name][2]) if not t and c is not None), "")

    def _attr(self, target: str) -> Any:
        if target in self._attr_consts:
            return self._attr_consts[target]
        key = self._attr_keys[target]
        return self.attrs[key] if key in self.attrs else getattr(self, key)

    def _env_from(self, flat: Sequence[Any]) -> dict[str, Any]:
        env: dict[str, Any] = {}
        if self.index == 0:
            if len(flat) != len(self._inputs):
                raise ValueError(f"stage 0 takes the model's {len(self._inputs)} inputs "
                                 f"({', '.join(self._inputs)}), got {len(flat)}")
            return dict(zip(self._inputs, flat))
        if self._consts_in:  # Python values recorded for one micro-batch shape: other shapes would be wrong
            for k, (x, ex) in enumerate(zip(flat, self.example_in)):
                if isinstance(x, torch.Tensor) and x.shape != ex.shape:
                    raise ValueError(f"stage {self.index} was built for inputs of one micro-batch of the example "
                                     f"({self._consts_in} crosses into it as a fixed Python value); input {k} has "
                                     f"shape {tuple(x.shape)}, not {tuple(ex.shape)}")
        it = iter(flat)
        for name in self._carried_in:
            spec, consts, is_tensor = self._layouts[name]
            env[name] = tree_unflatten([next(it) if t else c for c, t in zip(consts, is_tensor)], spec)
        return env

    def forward(self, *flat: Any) -> Any:
        env = self._env_from(flat)

        def value(a: fx.Node) -> Any:
            return self._attr(a.target) if a.op == "get_attr" else env[a.name]

        for node in self._nodes:
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            if node.op == "call_module":
                env[node.name] = self.part(*args, **kwargs)
            else:  # split_module's top level only unpacks partition outputs with operator.getitem
                env[node.name] = node.target(*args, **kwargs)
        if self.index == self.num_stages - 1:
            return fx.node.map_arg(self._loss_arg, value)
        out: list[torch.Tensor] = []
        for name in self._carried_out:
            _, _, is_tensor = self._layouts[name]
            out.extend(leaf for leaf, t in zip(tree_leaves(env[name]), is_tensor) if t)
        return tuple(out)


def _traced(model_or_traced: nn.Module | TracedModel, example_inputs: Sequence[Any] | None) -> TracedModel:
    if isinstance(model_or_traced, TracedModel):
        return model_or_traced
    if not isinstance(model_or_traced, nn.Module):
        raise ValueError(f"expected an nn.Module or a TracedModel, got {type(model_or_traced).__name__}")
    if example_inputs is None:
        raise ValueError("pipeline stages of an nn.Module need example_inputs to trace it with")
    return trace_model(model_or_traced, example_inputs, name=type(model_or_traced).__name__)


def _stage_of_op(traced: TracedModel, doc: Mapping[str, Any]) -> list[int]:
    """Stage index of every op, checking that ``stages`` tiles the traced ops in order."""
    stages = doc.get("stages")
    name = doc["graph"]["name"]
    if not stages:
        raise ValueError(f"placement of {name!r} has no 'stages' (it is not stage-contiguous): "
                         f"use apply() for single-process model parallelism, or a contiguous placement")
    ops = traced.graph.op_names
    if set(doc["ops"]) != set(ops):
        extra = sorted(set(doc["ops"]) ^ set(ops))
        raise ValueError(f"placement of graph {name!r} does not match the traced model "
                         f"({len(extra)} op names differ, e.g. {extra[0]!r})")
    out: list[int] = []
    for s, st in enumerate(stages):
        first, last = traced.graph.index(st["first_op"]), traced.graph.index(st["last_op"])
        if first != len(out) or last < first:
            raise ValueError(f"placement stage {s} ({st['first_op']}..{st['last_op']}) does not continue "
                             f"stage {s - 1}; stages must cover the ops in order")
        out.extend([s] * (last - first + 1))
    if len(out) != len(ops):
        raise ValueError(f"placement stages end at op {len(out) - 1} of {len(ops)}; they must cover every op")
    return out


def _microbatch(inputs: Sequence[Any], microbatches: int) -> tuple[Any, ...]:
    """The first micro-batch, split along dim 0 as ``torch.distributed.pipelining`` splits (``tensor_split``)."""
    return tuple(torch.tensor_split(x, microbatches, dim=0)[0] if isinstance(x, torch.Tensor) and x.dim() else x
                 for x in inputs)


def stage_modules(model_or_traced: nn.Module | TracedModel, placement: PlacementLike, *,
                  example_inputs: Sequence[Any] | None = None, microbatches: int | None = None) -> list[StageModule]:
    """All pipeline stages of ``placement`` as plain modules (no process group), in stage order.

    ``stages[0](*inputs)`` returns a tuple of tensors, each later stage takes the previous stage's tuple, and
    the last returns the loss: composing them in one process computes the model's step (useful for tests and to
    check a split). The modules share parameters with ``model_or_traced``. ``example_inputs`` (a whole batch)
    is required for an ``nn.Module`` and defaults to the TracedModel's; one micro-batch of it (the
    placement's ``schedule.microbatches`` unless ``microbatches`` is given) is run once to learn the structure
    of the values crossing each cut.
    """
    doc = _document(placement)
    traced = _traced(model_or_traced, example_inputs)
    stage_of = _stage_of_op(traced, doc)
    num_stages = len(doc["stages"])
    stage_by_name = dict(zip(traced.graph.op_names, stage_of))
    split = split_module(traced.gm, traced.gm, lambda n: stage_by_name[n.name])

    inputs = tuple(traced.example_inputs if example_inputs is None else example_inputs)
    m = int(microbatches or doc["schedule"]["microbatches"])
    if m > 1 and traced.graph.meta.get("trace") == "export":
        log.warning("%s was traced with torch.export, which specialises shapes to the example batch; "
                    "micro-batches of another size may fail or compute wrong values", traced.graph.name)
    mb = _microbatch(inputs, m)
    # With autograd on, so each crossing tensor's requires_grad is known: PipelineStage derives from it
    # which gradients flow back between stages.
    with torch.enable_grad(), buffers_restored(split):
        _, values = record_values(split, mb)

    top = [n for n in split.graph.nodes]
    output = top[-1]
    avail: dict[str, int] = {}  # first stage at which a node's value exists
    for n in top:
        if n.op == "placeholder":
            avail[n.name] = 0
        elif n.op == "call_module":
            avail[n.name] = int(_SUBMOD_RE.match(str(n.target)).group(1))
        elif n.op == "call_function":  # getitem of a partition's outputs
            avail[n.name] = avail[n.args[0].name]
    last_use = {name: -1 for name in avail}
    for n in top:
        if n.op == "get_attr" or n is output:
            continue
        for u in n.users:
            last_use[n.name] = max(last_use[n.name], num_stages - 1 if u is output else avail[u.name])

    layouts: dict[str, tuple[Any, list[Any], list[bool]]] = {}
    carried: list[list[str]] = []
    for s in range(num_stages - 1):
        names = [n.name for n in top if n.name in avail and avail[n.name] <= s < last_use[n.name]]
        for name in names:
            if name not in layouts:
                leaves, spec = tree_flatten(values[name])
                is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
                layouts[name] = (spec, [None if t else x for x, t in zip(leaves, is_tensor)], is_tensor)
        if not any(any(layouts[n][2]) for n in names):
            raise ValueError(f"no tensor crosses the cut after stage {s}; a pipeline stage needs an input")
        carried.append(names)

    placeholders = [n.name for n in top if n.op == "placeholder"]
    param_names = {id(p): name for name, p in traced.gm.named_parameters(remove_duplicate=False)}
    origins = {n.name: _origin(split, n) for n in top if n.op == "call_function"}
    loss_value = tree_map_only(torch.Tensor, _example,
                               fx.node.map_arg(output.args[0], lambda a: values.get(a.name)))
    examples = [tuple(tree_map_only(torch.Tensor, _example, mb))]
    examples += [_flat_tensors(values, names, layouts) for names in carried] + [loss_value]
    del values  # the recorded autograd graph
    out: list[StageModule] = []
    for s in range(num_stages):
        nodes = [n for n in top if n.op in ("call_module", "call_function") and avail[n.name] == s]
        part = getattr(split, f"submod_{s}", None)
        used_attrs = {a.target: _fetch(split, a.target) for n in nodes for a in n.all_input_nodes
                      if a.op == "get_attr"}
        loss_arg = output.args[0] if s == num_stages - 1 else None
        if loss_arg is not None:
            used_attrs.update({a.target: _fetch(split, a.target) for a in output.all_input_nodes
                               if a.op == "get_attr"})
        out.append(StageModule(index=s, num_stages=num_stages, nodes=nodes, part=part, attrs=used_attrs,
                               inputs=placeholders, carried_in=carried[s - 1] if s else [],
                               carried_out=carried[s] if s < num_stages - 1 else [], layouts=layouts,
                               loss_arg=loss_arg, example_in=examples[s], example_out=examples[s + 1],
                               param_names=param_names, origins=origins))
    return out


def _flat_tensors(values: Mapping[str, Any], names: list[str],
                  layouts: Mapping[str, tuple[Any, list[Any], list[bool]]]) -> tuple[torch.Tensor, ...]:
    return tuple(_example(leaf) for name in names
                 for leaf, t in zip(tree_leaves(values[name]), layouts[name][2]) if t)


def _example(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.requires_grad)


def _origin(split: fx.GraphModule, node: fx.Node) -> str:
    """The op name behind ``getitem(submod_k, i)`` of the split graph (for messages)."""
    part, index = node.args[0], node.args[1]
    try:
        out = next(n for n in split.get_submodule(str(part.target)).graph.nodes if n.op == "output").args[0]
        return out[index].name
    except (AttributeError, IndexError, TypeError, StopIteration):
        return node.name


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _shared_parameter(stages: Sequence[StageModule]) -> tuple[str, int, int] | None:
    """(model's name, first stage, second stage) of a parameter two stages both use, else None."""
    seen: dict[int, int] = {}
    for s, mod in enumerate(stages):
        for name, p in mod.named_parameters():
            if id(p) in seen and seen[id(p)] != s:
                return mod.param_names.get(id(p), name), seen[id(p)], s
            seen.setdefault(id(p), s)
    return None


def pipeline_stages(model_or_traced: nn.Module | TracedModel, placement: PlacementLike, rank: int, *,
                    example_inputs: Sequence[Any] | None = None, device: torch.device | str | None = None,
                    device_map: Mapping[str, Any] | None = None, microbatches: int | None = None,
                    group: Any = None) -> PipelineStage:
    """The ``torch.distributed.pipelining.PipelineStage`` that ``rank`` runs for ``placement``'s ``stages``.

    Stage ``rank`` of :func:`stage_modules` moves to ``device`` (default: the placement's device of that stage,
    after ``device_map``; ``cpu:N`` becomes ``cpu``). The process group (``group``, default the world) must
    already be initialised with one rank per stage. Run it with :func:`pipeline_schedule` (same
    ``microbatches``: the stage's shapes are those of one micro-batch of ``example_inputs``); the last stage's
    output is the micro-batch loss. One-line ``ValueError`` when the placement has no stages, the rank or world
    size does not fit, or a parameter is used by two stages.
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    doc = _document(placement)
    _check_device_map(doc, device_map)
    stages = stage_modules(model_or_traced, doc, example_inputs=example_inputs, microbatches=microbatches)
    n = len(stages)
    if not isinstance(rank, int) or not 0 <= rank < n:
        raise ValueError(f"rank {rank!r} has no stage: the placement has {n} stages (ranks 0..{n - 1})")
    shared = _shared_parameter(stages)
    if shared is not None:
        raise ValueError(f"parameter {shared[0]!r} is used by stages {shared[1]} and {shared[2]}; each stage must "
                         f"own its parameters (place every call of a module on one device)")
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call init_process_group (or run under torchrun)")
    world = dist.get_world_size(group)
    if world != n:
        raise ValueError(f"the placement has {n} pipeline stages but the process group has {world} ranks; "
                         f"run with --nproc-per-node={n}")
    if device is None:
        device = resolve_device(doc["devices"][doc["stages"][rank]["device"]], device_map)
    device = torch.device(device)
    if device.type == "cpu":
        device = torch.device("cpu")  # cpu:N is this machine's CPU; pipelining compares devices exactly
    module = stages[rank].to(device)
    # Static shapes from the recorded micro-batch: with runtime shape inference, a stage would run once on
    # uninitialised receive buffers, and integer inputs (class targets) would then index out of range.
    ex_in = tuple(t.to(device) for t in module.example_in)
    ex_out = tree_map_only(torch.Tensor, lambda t: t.to(device), module.example_out)
    return PipelineStage(module, rank, n, device, input_args=ex_in, output_args=ex_out, group=group)


def pipeline_loss(output: torch.Tensor, target: Any = None) -> torch.Tensor:
    """``loss_fn`` for the schedules: the last stage already returns the micro-batch's loss."""
    return output


def pipeline_schedule(stage: PipelineStage, placement: PlacementLike, *,
                      microbatches: int | None = None) -> PipelineScheduleSingle:
    """``ScheduleGPipe`` or ``Schedule1F1B`` for ``stage`` by the placement's ``schedule`` (name, micro-batches).

    ``none`` and ``gpipe`` run GPipe, ``1f1b`` and ``interleaved-1f1b`` (one stage per rank here) run 1F1B.
    Gradients are divided by the number of micro-batches (``scale_grads``), so with a mean loss per
    micro-batch and equal micro-batches they equal the full batch's; the step's loss is the mean of the
    micro-batch losses. Call ``step(*inputs, target=dummy, losses=list)`` with ``dummy`` any tensor with the
    batch on dim 0 on the last rank (it is split but unused).
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    doc = _document(placement)
    name = doc["schedule"]["name"]
    m = int(microbatches or doc["schedule"]["microbatches"])
    if name in ("1f1b", "interleaved-1f1b"):
        if m < stage.num_stages:
            raise ValueError(f"1f1b needs at least as many micro-batches as stages ({stage.num_stages}), got {m}")
        if name == "interleaved-1f1b":
            log.warning("one stage per rank: running interleaved-1f1b as 1f1b")
        return Schedule1F1B(stage, m, loss_fn=pipeline_loss, scale_grads=True)
    return ScheduleGPipe(stage, m, loss_fn=pipeline_loss, scale_grads=True)
