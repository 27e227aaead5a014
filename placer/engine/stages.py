"""Pipeline stages of a traced step: the step's ``torch.fx`` graph cut into stages with
``torch.fx.passes.split_module`` (:func:`split_stages`), each a :class:`StageModule` that
``torch.distributed.pipelining.PipelineStage`` runs. The one stage type of the project: the engine's
``pipelining`` backend (:mod:`placer.engine.pipelining`) and the trainers' loaders
(:func:`placer.io.loaders.pipeline_stages`) both build theirs here.

A pipeline stage can only receive the previous stage's outputs, so every value a later stage needs (the integer
targets, activations skipping a stage, each tensor of a tuple such as ``LSTMCell``'s ``(h, c)``) is handed on
through the stages in between; Python values that are not tensors (e.g. ``x.size(0)``) are fixed at their value
for the recorded micro-batch (a stage fed other shapes says so in a one-line ``ValueError``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_map_only, tree_unflatten
from torch.utils.checkpoint import checkpoint

from graphs.batch import batched_tensors, is_batched
from graphs.inplace import activations_out_of_place
from graphs.strides import views_reshaped
from graphs.trace import buffers_restored, record_values
from placer.engine.program import input_spec, placeholder_values

__all__ = ["StageModule", "split_stages"]

_SUBMOD_RE = re.compile(r"^submod_(\d+)$")


class StageModule(nn.Module):
    """Pipeline stage ``index`` of a split step: ``forward(*tensors)`` → the next stage's tensors, or the loss.

    Stage 0 takes the model's inputs, or their batched tensors (:func:`graphs.batch.batched_tensors`, what
    ``PipelineStage`` accepts: tensors only) when an input is a container such as a dict; stage ``s > 0`` takes
    the tensors stage ``s - 1`` returned. The partition
    ``split_module`` made for this stage (if the stage computes anything) is registered as ``part``, so
    ``parameters()`` are exactly this stage's parameters (plus any parameter read by ``get_attr``).
    """

    def __init__(self, *, index: int, num_stages: int, nodes: list[fx.Node], part: nn.Module | None,
                 attrs: Mapping[str, Any], inputs: list[str], carried_in: list[str], carried_out: list[str],
                 layouts: Mapping[str, tuple[Any, list[Any], list[bool]]], loss_arg: Any,
                 example_in: tuple[torch.Tensor, ...] = (), example_out: Any = (),
                 param_names: Mapping[int, str] | None = None, origins: Mapping[str, str] | None = None,
                 input_layout: tuple[Any, list[Any], list[bool]] | None = None,
                 in_spec: TreeSpec | None = None) -> None:
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
        self._input_layout = input_layout
        """Stage 0: the model inputs' tree spec, the leaves that are not batched tensors, which leaves are."""
        self._in_spec = in_spec
        """Stage 0 of a torch.export step: its input tree, whose leaves the placeholders are (a dict batch)."""
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
            layout = self._input_layout
            nested = layout is not None and not all(c.is_leaf() for c in layout[0].children())
            given = flat
            if (layout is not None and len(flat) == sum(layout[2]) and all(isinstance(x, torch.Tensor) for x in flat)
                    and (nested or len(flat) != len(self._inputs))):  # the batched tensors, not the inputs as given
                it = iter(flat)
                given = tree_unflatten([next(it) if t else c for c, t in zip(*layout[1:])], layout[0])
            values = placeholder_values(given, self._in_spec)
            if len(values) != len(self._inputs):
                raise ValueError(f"stage 0 takes the model's {len(self._inputs)} inputs "
                                 f"({', '.join(self._inputs)}), got {len(values)}")
            return dict(zip(self._inputs, values))
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

    recompute: bool = False
    """Activation checkpointing: keep only the stage's inputs for backward and run its forward again there
    (``torch.utils.checkpoint``, non-reentrant); set for the devices a plan's ``recompute`` names."""

    def forward(self, *flat: Any) -> Any:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, *flat, use_reentrant=False)
        return self._forward(*flat)

    def _forward(self, *flat: Any) -> Any:
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
        return tuple(t.contiguous() for t in out)  # sent as they are: gloo and nccl take contiguous tensors


def _carried_values(top: list[fx.Node], values: Mapping[str, Any], num_stages: int
                    ) -> tuple[dict[str, int], list[list[str]], dict[str, tuple[Any, list[Any], list[bool]]]]:
    """For the split graph's top-level nodes: the first stage at which each value exists, the values each cut
    carries (everything a later stage reads), and each carried value's layout (tree spec, its Python constants,
    which leaves are tensors). A cut with no tensor to carry is a one-line ``ValueError``."""
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
    return avail, carried, layouts


def split_stages(gm: fx.GraphModule, stage_of_node: Mapping[str, int], num_stages: int,
                 microbatch: Sequence[Any]) -> list[StageModule]:
    """``gm`` (a traced step returning its loss) cut into ``num_stages`` :class:`StageModule`s with
    ``torch.fx.passes.split_module``: node ``n`` goes to stage ``stage_of_node[n.name]`` (compute nodes; inputs
    enter at stage 0). The stages share parameters and buffers with ``gm``. ``microbatch`` (one micro-batch of
    the step's inputs) is run once to learn the structure of the values crossing each cut and the stages'
    example inputs and outputs."""
    split = split_module(gm, gm, lambda n: stage_of_node[n.name])
    in_spec = input_spec(gm)
    for part in split.children():  # a stage's inputs are contiguous autograd leaves: no in-place op, no view
        if isinstance(part, fx.GraphModule):
            activations_out_of_place(part)
            views_reshaped(part)
    # With autograd on, so each crossing tensor's requires_grad is known: PipelineStage derives from it
    # which gradients flow back between stages.
    with torch.enable_grad(), buffers_restored(split, microbatch):  # split_module's graph takes the placeholders
        _, values = record_values(split, placeholder_values(microbatch, in_spec))

    top = [n for n in split.graph.nodes]
    output = top[-1]
    avail, carried, layouts = _carried_values(top, values, num_stages)

    placeholders = [n.name for n in top if n.op == "placeholder"]
    param_names = {id(p): name for name, p in gm.named_parameters(remove_duplicate=False)}
    origins = {n.name: _origin(split, n) for n in top if n.op == "call_function"}
    loss_value = tree_map_only(torch.Tensor, _example,
                               fx.node.map_arg(output.args[0], lambda a, v=values: v.get(a.name)))
    leaves, spec = tree_flatten(tuple(microbatch))
    batched = [is_batched(x) for x in leaves]
    input_layout = (spec, [None if b else x for x, b in zip(leaves, batched)], batched)
    examples = [tuple(_example(x) for x in batched_tensors(microbatch))]
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
                               param_names=param_names, origins=origins,
                               input_layout=input_layout if s == 0 else None,
                               in_spec=in_spec if s == 0 else None))
    return out




def _flat_tensors(values: Mapping[str, Any], names: list[str],
                  layouts: Mapping[str, tuple[Any, list[Any], list[bool]]]) -> tuple[torch.Tensor, ...]:
    return tuple(_example(leaf) for name in names
                 for leaf, t in zip(tree_leaves(values[name]), layouts[name][2]) if t)


def _example(t: torch.Tensor) -> torch.Tensor:
    """A value's stand-in for ``PipelineStage``'s static shapes; contiguous, as stages send their values (torch
    makes its receive buffers like these, and gloo refused one laid out as a transpose)."""
    return t.detach().contiguous().requires_grad_(t.requires_grad)


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
