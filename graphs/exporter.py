"""torch.export of a training step with a dynamic batch dimension: the fallback of :mod:`graphs.trace` where fx
cannot trace a model (or keeps a composite module whole).

The batch dimension (dim 0 of every batched input) is ``Dim.AUTO``: export keeps it symbolic (``sym_size`` nodes
feed the views), so the graph runs at any micro-batch size, or specialises it where the model bakes its batch in
(that graph is then exported static and :mod:`graphs.microbatch` finds the op). The smallest batch export's
guards allow is kept as ``gm.meta["batch_min"]``. A step that updates a tensor in place that is read again
(``h[:, 0] = 0`` on an activation, which fx cannot trace) is functionalized (``run_decompositions({})``: the
update becomes an out-of-place scatter that its readers consume), so it splits over devices like any other op.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from graphs.batch import is_batched
from graphs.inplace import copied, written_args
from graphs.strides import views_reshaped

__all__ = ["STEP_PREFIX", "trace_export"]

log = logging.getLogger(__name__)
STEP_PREFIX = "model"  # attribute name of the user model inside the export wrapper
_BLOCKS = {"wrap_with_set_grad_enabled": "a torch.no_grad() block", "wrap_with_autocast": "an autocast block"}


class _Step(nn.Module):
    """``loss_fn(model(*inputs))`` as one module, for torch.export."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.__dict__["_loss_fn"] = loss_fn  # not registered: a loss module's internals are inlined

    def forward(self, *inputs: Any) -> Any:
        return self.__dict__["_loss_fn"](self.model(*inputs))


def _export(model: nn.Module, loss_fn: Callable[[Any], Any], inputs: tuple, *, dynamic: bool) -> Any:
    torch_log = logging.getLogger("torch")
    old_level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    noise = io.StringIO()  # export dumps partial graphs to stderr on failure; keep them out of the user's way
    # dim 0 of every batched tensor dynamic, in a dict batch too (the spec follows the inputs' tree)
    batch = (tree_map(lambda x: {0: torch.export.Dim.AUTO} if is_batched(x) else None, a) for a in inputs)
    try:
        with contextlib.redirect_stderr(noise):
            return torch.export.export(_Step(model, loss_fn), tuple(inputs),
                                       dynamic_shapes=(tuple(batch),) if dynamic else None)
    finally:
        torch_log.setLevel(old_level)
        if noise.getvalue():
            log.debug("torch.export stderr:\n%s", noise.getvalue())


def _updates_a_read_value(graph: fx.Graph) -> bool:
    """Whether the exported step changes a tensor in place that something else reads, or through a view
    (``h[:, 0] = 0`` is ``fill_`` of a ``select`` of ``h``): on the engine's workers each device updates its own
    copy and the readers elsewhere never see it (or autograd refuses the update of a received leaf). A buffer
    updated and not read again (BatchNorm's ``num_batches_tracked``) is not such an update."""
    return any(isinstance(arg, fx.Node) and (len(arg.users) > 1 or getattr(arg.target, "is_view", False))
               for node in graph.nodes for arg in written_args(node))


def _attributes_at_first_use(graph: fx.Graph) -> None:
    """Each parameter and buffer read (``get_attr``) moved to just before its first reader. Export puts them all
    first, so a layer's weights came before layer 0's ops: no placement of layers onto devices was then one run of
    ops per device, and pipeline stages, which are such runs, could not be cut (fx reads them where used)."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node in [n for n in graph.nodes if n.op == "get_attr" and n.users]:
        min(node.users, key=position.__getitem__).prepend(node)


def trace_export(model: nn.Module, loss_fn: Callable[[Any], Any], inputs: tuple, *,
                  legacy: bool = False) -> fx.GraphModule:
    """torch.export of the step, the batch dimension dynamic (static when the model bakes it in, or ``legacy``)."""
    try:
        ep = _export(model, loss_fn, inputs, dynamic=not legacy)
    except Exception:  # noqa: BLE001 - a model that specialises its batch: export it static, flagged later
        if legacy:
            raise
        log.debug("dynamic-batch export failed; exporting static shapes", exc_info=True)
        ep = _export(model, loss_fn, inputs, dynamic=False)
    functional = _updates_a_read_value(ep.graph)
    blocks = {_BLOCKS.get(str(n.target), str(n.target)) for n in ep.graph.nodes
              if isinstance(n.target, torch._ops.HigherOrderOperator)}
    if functional and blocks:  # run_decompositions inlines them: a no_grad block's ops would need gradients
        raise RuntimeError(f"the step updates a tensor in place through a view or after reading it, beside "
                           f"{', '.join(sorted(blocks))}: functionalizing it would drop the block; write that update "
                           "out of place (h = h.index_fill(...), torch.where)")
    if functional:
        ep = ep.run_decompositions({})  # functional: select_scatter and friends, buffers written back at the end
    gm = ep.module()
    if not legacy:
        _attributes_at_first_use(gm.graph)
    # A view export chose for the strides it saw, which need not be the kernels' (T5: the fake attention output
    # follows the query's layout, the real one is contiguous, so the step failed on its own batch).
    views_reshaped(gm)
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.copy.default:  # ``x[:, 1:3] *= 2`` writes back so; no autograd formula
            node.target = copied
    # The smallest batch the export's guards allow (2 is export's 0/1 specialisation, not the model's): a model
    # branching on its batch size is exported for one branch, which micro-batches below the bound do not take.
    lowers = [int(r.lower) for r in ep.range_constraints.values() if str(r.lower).lstrip("-").isdigit()]
    gm.meta["batch_min"] = max(lowers, default=0)
    for key, hook in list(gm._forward_pre_hooks.items()):  # shapes are checked where they matter, per op
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
    # Input guards are a call_module with no users; they are not part of the step's computation.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards") and not node.users:
            gm.graph.erase_node(node)
            if hasattr(gm, node.target):
                delattr(gm, node.target)
    # Same calling convention as the fx path: flat positional inputs in, the loss node itself out (export
    # wraps both in pytree specs). Only possible when every input is a plain tensor.
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat_out = output.args[0]
    if isinstance(flat_out, (tuple, list)) and len(flat_out) == 1:
        codegen = gm.graph._codegen
        if all(isinstance(x, torch.Tensor) for x in inputs):
            gm.graph.set_codegen(fx.graph.CodeGen())
        elif isinstance(codegen, fx.graph._PyTreeCodeGen) and codegen.pytree_info is not None:
            # a dict batch keeps export's input tree (its placeholders are the leaves); the loss comes out alone
            codegen.pytree_info = codegen.pytree_info._replace(out_spec=None)
        output.args = (flat_out[0],)
    gm.recompile()
    return gm
