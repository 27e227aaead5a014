"""Loaders for trainers: put a placement JSON (``placer.placement/v1``) to work on a real ``nn.Module``.

Two ways, matching the two ways a placement can be trained (see ARCHITECTURE.md, "Placement JSON"):

* :func:`apply` — **single-process model parallelism**, as ColocRL's placements were run (Mirhoseini et al.,
  ICML 2017): each module listed under ``modules`` moves to its device with its parameters, and a forward
  pre-hook moves the module's tensor inputs to that device. ``Tensor.to`` is differentiable, so gradients
  cross devices back the same way. Only *module* placement is applied: functional ops between modules (adds,
  cats, getitems) run wherever their inputs are. The per-op ``ops`` mapping is for placer's own engine.
* :func:`rank_pipeline_stages` — **pipeline parallelism** with ``torch.distributed.pipelining`` (GPipe, Huang et
  al. 2019; 1F1B, Narayanan et al. 2021; interleaved 1F1B): the traced fx graph of the step is cut at the
  ``stages`` boundaries with ``torch.fx.passes.split_module``, and rank ``r`` of ``R`` gets a ``PipelineStage``
  for each of stages ``r``, ``r + R``, ... (one, or an interleaved plan's virtual stages). A pipeline stage
  can only receive the previous stage's outputs, so every value a later stage needs (the integer targets,
  activations skipping a stage, each tensor of a tuple such as ``LSTMCell``'s ``(h, c)``) is handed on through
  the stages in between. Model inputs all enter at stage 0, as a data loader feeds the first stage. The last
  stage returns the step's scalar loss; :func:`pipeline_schedule` pairs it with an identity ``loss_fn``.

Limits: every rank builds the whole model and keeps only its stage's modules busy; a parameter used by two
stages (an ``nn.Module`` called on both sides of a cut) would get two unsynchronised copies, so
:func:`rank_pipeline_stages` refuses it — placer's colocation rule (all calls of a module on one device) never makes
such a placement. Python values that are not tensors (e.g. ``x.size(0)``) cannot be sent between stages; they
are fixed at their value for one micro-batch of ``example_inputs``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from graphs.trace import TracedModel
from placer.io.document import PlacementLike, document_of
from placer.io.stages import StageModule, stage_modules

if TYPE_CHECKING:  # imported lazily at run time: torch.distributed is only needed by pipeline users
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

log = logging.getLogger(__name__)

__all__ = ["apply", "placed_devices", "resolve_device", "StageModule", "stage_modules", "pipeline_stages",
           "rank_pipeline_stages", "pipeline_schedule", "pipeline_loss", "module_fqns_per_model_part"]



# ---------------------------------------------------------------------------------------------- documents


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
    run where their inputs are; a parameter or buffer of the root module itself (a ViT's position embedding)
    goes to the device of the op reading it (``ops``). Raises a one-line ``ValueError`` for a module path the
    model lacks or a device this machine lacks. The model is modified in place.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply needs an nn.Module, got {type(model).__name__}")
    doc = document_of(placement)
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
    _check_covered(model, modules, doc)
    own = [(n, t) for n, t in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]
           if n in doc["ops"]]  # the root's own tensors, read by get_attr ops of those names
    used = set(modules.values()) | {int(doc["ops"][n]) for n, _ in own}
    devices = {i: resolve_device(doc["devices"][i], device_map) for i in sorted(used)}
    if not modules:
        log.warning("placement for %s lists no modules; nothing to place", doc["graph"]["name"])
    _remove_hooks(model)
    for path, mod in targets:
        device = devices[modules[path]]
        mod.to(device)
        mod.register_forward_pre_hook(_MoveInputs(device), with_kwargs=True)
    for name, t in own:  # the same objects afterwards (an optimizer made before still holds them), moved
        moved = t.detach().to(devices[int(doc["ops"][name])])
        if moved.device != t.device:
            torch.utils.swap_tensors(t, nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved)
    log.info("placed %d modules of %s on %s", len(targets), type(model).__name__,
             ", ".join(sorted({str(d) for d in devices.values()})))
    return model


def _check_covered(model: nn.Module, modules: Mapping[str, int], doc: Mapping[str, Any]) -> None:
    """A one-line ``ValueError`` when a parameter of ``model`` lies under no placed module: the placement was made
    for another model (a layer more, another architecture whose first module names happen to match)."""
    if not modules:
        return
    placed = set(modules)
    if "" in placed:
        return  # the root module is placed: everything is under it

    def covered(name: str) -> bool:
        parts = name.split(".")[:-1]
        if not parts:
            return True  # the root module's own parameter: under no module, it stays where it is
        return any(".".join(parts[:k]) in placed for k in range(1, len(parts) + 1))

    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):  # a tied weight counts under any name
        names.setdefault(id(param), []).append(name)
    for aliases in names.values():
        if not any(covered(n) for n in aliases):
            raise ValueError(f"parameter {aliases[0]!r} of {type(model).__name__} is under no module of the "
                             f"placement (made for graph {doc['graph']['name']!r}): it was made for another model")


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


def _shared_parameter(stages: Sequence[StageModule]) -> tuple[str, int, int] | None:
    """(model's name, first stage, second stage) of a parameter two stages both use, else None."""
    seen: dict[int, int] = {}
    for s, mod in enumerate(stages):
        for name, p in mod.named_parameters():
            if id(p) in seen and seen[id(p)] != s:
                return mod.param_names.get(id(p), name), seen[id(p)], s
            seen.setdefault(id(p), s)
    return None


def module_fqns_per_model_part(placement: PlacementLike, model: nn.Module | None = None) -> list[list[str]]:
    """The placement's split as torchtitan's ``module_fqns_per_model_part`` (per stage, the module FQNs it owns),
    for trainers that build their stages from module names (torchtitan's ``pipeline_module_split``). With
    ``model``, every FQN must name one of its modules. One-line ``ValueError`` when the placement has no such
    split (not stage-contiguous, or a stage boundary inside a module) or ``model`` lacks a module."""
    doc = document_of(placement)
    parts = doc.get("module_fqns_per_model_part")
    if not parts:
        why = "it is not stage-contiguous" if not doc.get("stages") else "a stage boundary cuts a module"
        raise ValueError(f"placement of {doc['graph']['name']!r} has no module_fqns_per_model_part ({why})")
    if model is not None:
        missing = [f for stage in parts for f in stage if not _has_submodule(model, f)]
        if missing:
            raise ValueError(f"placement module {missing[0]!r} is not in model {type(model).__name__} "
                             f"({len(missing)} unknown; placement made for graph {doc['graph']['name']!r})")
    return [list(stage) for stage in parts]


def pipeline_stages(model_or_traced: nn.Module | TracedModel, placement: PlacementLike, rank: int, *,
                    example_inputs: Sequence[Any] | None = None, device: torch.device | str | None = None,
                    device_map: Mapping[str, Any] | None = None, microbatches: int | None = None,
                    group: Any = None) -> PipelineStage:
    """The one ``torch.distributed.pipelining.PipelineStage`` that ``rank`` runs for ``placement``'s ``stages``:
    :func:`rank_pipeline_stages` of a placement with one stage per device (a one-line ``ValueError`` for an
    interleaved one, whose ranks run several)."""
    stages = rank_pipeline_stages(model_or_traced, placement, rank, example_inputs=example_inputs, device=device,
                                  device_map=device_map, microbatches=microbatches, group=group)
    if len(stages) != 1:
        raise ValueError(f"rank {rank} runs {len(stages)} stages of this interleaved placement: use "
                         f"rank_pipeline_stages, and pipeline_schedule with the list")
    return stages[0]


def rank_pipeline_stages(model_or_traced: nn.Module | TracedModel, placement: PlacementLike, rank: int, *,
                         example_inputs: Sequence[Any] | None = None, device: torch.device | str | None = None,
                         device_map: Mapping[str, Any] | None = None, microbatches: int | None = None,
                         group: Any = None) -> list[PipelineStage]:
    """The ``torch.distributed.pipelining.PipelineStage``s that ``rank`` runs for ``placement``'s ``stages``.

    With ``R`` ranks (the devices of the stages), stage ``k`` runs on rank ``k mod R``: one stage per rank, or
    several (virtual stages), as torch's interleaved schedules lay them out and
    :func:`placer.io.document.contiguous_stages` writes them. Stage ``k`` of :func:`stage_modules` moves to
    ``device`` (default: the placement's device of that stage, after ``device_map``; ``cpu:N`` becomes ``cpu``).
    The process group (``group``, default the world) must already be initialised with ``R`` ranks. Run them with
    :func:`pipeline_schedule` (same ``microbatches``: the stages' shapes are those of one micro-batch of
    ``example_inputs``); the last stage's output is the micro-batch loss. One-line ``ValueError`` when the
    placement has no stages, the rank or world size does not fit, or a parameter is used by two stages.
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    doc = document_of(placement)
    _check_device_map(doc, device_map)
    stages = stage_modules(model_or_traced, doc, example_inputs=example_inputs, microbatches=microbatches)
    n, ranks = len(stages), len({st["device"] for st in doc["stages"]})
    if not isinstance(rank, int) or not 0 <= rank < ranks:
        raise ValueError(f"rank {rank!r} has no stage: the placement's {n} stages run on {ranks} ranks "
                         f"(0..{ranks - 1})")
    shared = _shared_parameter(stages)
    if shared is not None:
        raise ValueError(f"parameter {shared[0]!r} is used by stages {shared[1]} and {shared[2]}; each stage must "
                         f"own its parameters (place every call of a module on one device)")
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call init_process_group (or run under torchrun)")
    world = dist.get_world_size(group)
    if world != ranks:
        raise ValueError(f"the placement's {n} pipeline stages run on {ranks} devices but the process group has "
                         f"{world} ranks; run with --nproc-per-node={ranks}")
    out = []
    for k in range(rank, n, ranks):
        dev = torch.device(device if device is not None
                           else resolve_device(doc["devices"][doc["stages"][k]["device"]], device_map))
        if dev.type == "cpu":
            dev = torch.device("cpu")  # cpu:N is this machine's CPU; pipelining compares devices exactly
        module = stages[k].to(dev)
        # Static shapes from the recorded micro-batch: with runtime shape inference, a stage would run once on
        # uninitialised receive buffers, and integer inputs (class targets) would then index out of range.
        ex_in = tuple(t.to(dev) for t in module.example_in)
        ex_out = tree_map_only(torch.Tensor, lambda t, d=dev: t.to(d), module.example_out)
        out.append(PipelineStage(module, k, n, dev, input_args=ex_in, output_args=ex_out, group=group))
    return out


def pipeline_loss(output: torch.Tensor, target: Any = None) -> torch.Tensor:
    """``loss_fn`` for the schedules: the last stage already returns the micro-batch's loss."""
    return output


def pipeline_schedule(stage: PipelineStage | Sequence[PipelineStage], placement: PlacementLike, *,
                      microbatches: int | None = None) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """The torch schedule for this rank's stage (or stages) by the placement's ``schedule`` (name, micro-batches).

    ``none`` and ``gpipe`` run ``ScheduleGPipe``, ``1f1b`` runs ``Schedule1F1B``; a rank with several stages (an
    interleaved placement, :func:`rank_pipeline_stages`) runs ``ScheduleInterleaved1F1B`` over them;
    ``interleaved-1f1b`` with one stage per rank runs 1F1B; ``dataflow`` (placer's list-scheduled order, which
    torch does not ship) runs GPipe, with a warning.
    Gradients are divided by the number of micro-batches (``scale_grads``), so with a mean loss per
    micro-batch and equal micro-batches they equal the full batch's; the step's loss is the mean of the
    micro-batch losses. Call ``step(*inputs, target=dummy, losses=list, return_outputs=False)`` with ``dummy``
    any tensor with the batch on dim 0 on the last rank (it is split but unused; the last stage returns the
    scalar loss, which torch cannot concatenate into outputs: hence ``return_outputs=False``); when an input is
    a container (a dict batch), pass ``*graphs.batch.batched_tensors(inputs)`` instead (torch's stages take
    tensors only; stage 0 rebuilds the dict).
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    doc = document_of(placement)
    name = doc["schedule"]["name"]
    m = int(microbatches or doc["schedule"]["microbatches"])
    stages = list(stage) if isinstance(stage, (list, tuple)) else [stage]
    if len(stages) > 1:  # each rank's stages go round the ranks: torch's interleaved layout
        if name != "interleaved-1f1b":
            log.warning("several stages per rank: running %s as interleaved-1f1b", name)
        return ScheduleInterleaved1F1B(stages, m, loss_fn=pipeline_loss, scale_grads=True)
    stage = stages[0]
    if name in ("1f1b", "interleaved-1f1b"):
        if m < stage.num_stages:
            raise ValueError(f"1f1b needs at least as many micro-batches as stages ({stage.num_stages}), got {m}")
        if name == "interleaved-1f1b":
            log.warning("one stage per rank: running interleaved-1f1b as 1f1b")
        return Schedule1F1B(stage, m, loss_fn=pipeline_loss, scale_grads=True)
    if name == "dataflow":
        log.warning("torch.distributed.pipelining has no dataflow order: running gpipe")
    return ScheduleGPipe(stage, m, loss_fn=pipeline_loss, scale_grads=True)
