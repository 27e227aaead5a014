"""Tracing steps whose ``forward`` writes state in place or runs under a mode or gradient of its own: buffers
updated and reassigned, an input batch written in place, views updated in place, ``torch.no_grad()`` and
``torch.autocast`` blocks, custom backwards and activation hooks (fixtures: :mod:`tests.fixtures_state`)."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` factories

from graphs.profile import profile  # noqa: E402
from graphs.trace import TraceError, buffers_restored, trace_model  # noqa: E402
from tests import fixtures_state as fst  # noqa: E402


def test_in_place_buffer_updates_are_kept_and_ordered_before_their_readers():
    """fx answered ``self.scale`` with the tensor itself, so ``self.scale.mul_(0.5)`` ran once while tracing and
    was not in the step; and nothing ordered an update before the buffer's later reads. Both are now ops of the
    graph, and the readers consume the update."""
    model, (x,) = fst.buffer_updates()
    eager = copy.deepcopy(model)(x).item()  # the first step's loss, buffers updated during it
    traced = trace_model(model, (x,), name="buffers")
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    assert {"mul_", "add_"} <= set(nodes)
    readers = {u.name for n in ("mul_", "add_") for u in nodes[n].users}
    assert readers and readers <= {"mul", "sub"}, readers  # h * scale and ... - total read the updated values
    assert traced.gm(x).item() == pytest.approx(eager, rel=1e-6)
    assert {"mul_", "add_"} <= set(traced.graph.op_names)


def test_augmented_and_reassigned_buffers_are_updated_by_the_step_as_in_eager():
    """``self.steps += 1`` traced as ``steps = steps + 1`` (fx's proxies have no ``__iadd__``) and
    ``self.ema = 0.9 * self.ema + ...`` left the module holding a Proxy: the step's loss was a Proxy and tracing
    failed, and no step would have kept the buffers' updates. Both are now in-place updates of the buffer, so two
    traced steps give eager's two losses and buffers; tracing leaves the model's own buffer tensors as built. Each
    update shares its buffer's colocation group: on another device (or pipeline stage) it would update a copy."""
    model, (x,) = fst.buffer_assignments()
    built = {k: (b, b.clone()) for k, b in model.named_buffers()}
    eager = copy.deepcopy(model)
    want = [eager(x).item() for _ in range(2)]
    traced = trace_model(model, (x,), name="assignments")
    for k, b in model.named_buffers():
        assert b is built[k][0] and torch.equal(b, built[k][1]), k
    assert {"add_", "mul_", "copy_"} <= set(traced.graph.op_names)
    group = dict(zip(traced.graph.op_names, traced.graph.colocation))  # an update runs where its buffer lives
    assert group["steps"] == group["add_"] and group["ema"] == group["ema_1"] == group["copy_"] != group["steps"]
    assert [traced.gm(x).item() for _ in range(2)] == pytest.approx(want, rel=1e-6)
    after = dict(eager.named_buffers())
    for k, b in traced.gm.named_buffers():
        torch.testing.assert_close(b, after[k], msg=k)


def test_a_step_that_writes_its_batch_in_place_is_traced_on_the_batch_as_given():
    """``x.mul_(2)`` on an input: tracing, the batch-mixing check and profiling run the step many times; each run
    wrote the example batch again, so the traced loss was not eager's on the user's batch and the micro-batch check
    called a per-sample model batch-mixing. Now each run gets the batch as given and the caller's is unchanged."""
    model, (batch,) = fst.input_written_in_place()
    given = {k: v.clone() for k, v in batch.items()}
    want = copy.deepcopy(model)({k: v.clone() for k, v in batch.items()}).item()
    traced = trace_model(model, (batch,), name="writes")
    profile(traced, warmup=1, repeats=2)
    for k, v in batch.items():
        assert torch.equal(v, given[k]), k
    assert traced.graph.meta["microbatchable"] is True, traced.graph.meta.get("microbatch_why")
    with buffers_restored(traced.gm, traced.example_inputs):
        assert traced.gm(*traced.example_inputs).item() == pytest.approx(want, rel=1e-6)
    assert torch.equal(batch["x"], given["x"])


def test_a_torch_autocast_block_in_forward_is_traced_with_its_precision():
    """fx records the ops of a ``torch.autocast`` block, not the precision they run in: the traced step ran the
    block in float32 (loss 0.0534560 against eager's 0.0534426 on this example; on a GPU other costs too). fx now
    refuses such a step, pointing at the user's line, and torch.export keeps the block under its autocast."""
    model, (x,) = fst.autocast_block()
    want = model(x).item()
    traced = trace_model(model, (x,), name="autocast")
    assert traced.graph.meta["trace"] == "export"
    assert "torch.autocast('cpu') in forward" in traced.graph.meta["trace_note"]
    assert "(at forward, fixtures_state.py:" in traced.graph.meta["trace_note"]  # the user's line, not the tracer's
    assert traced.gm(x).item() == want  # bfloat16 inside the block, as in eager


@pytest.mark.parametrize("factory, finding", [
    (fst.custom_backward, "would not train 'a.weight', which the model's own step does"),
    (fst.activation_hook, "computes another gradient for 'a.weight' than the model's own step"),
])
def test_a_step_whose_gradients_tracing_cannot_keep_is_refused(factory, finding):
    """A custom ``torch.autograd.Function`` and a gradient hook registered in ``forward``: both tracers keep
    neither, and the traced step was silently another (``a`` untrained; ``a``'s gradient twice eager's). The
    build compares the traced step's gradients with the model's own and refuses in one line. (The hook's model
    failed before that: the first eager run had gradients off, and a hook cannot be registered then.)"""
    model, inputs = factory()
    with pytest.raises(ValueError, match="tracing keeps neither") as err:
        trace_model(model, inputs, name="grads")
    assert finding in str(err.value) and "\n" not in str(err.value)


def test_a_buffer_set_to_another_shape_is_the_steps_value_and_the_model_keeps_its_own(caplog):
    """``self.last = h.detach()`` into a buffer built empty: no in-place update can hold it, so the step reads the
    value as fx traced it (before, the module was left holding a Proxy) and the user is told it is not kept."""

    class Last(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 16)
            self.register_buffer("last", torch.zeros(0))

        def forward(self, x):
            self.last = self.a(x).detach()
            return (self.a(x) * self.last).mean()

    model, x = Last(), torch.randn(4, 8)
    built = model.last
    traced = trace_model(model, (x,), name="last")
    assert traced.graph.meta["trace"] == "fx" and "copy_" not in traced.graph.op_names
    assert model.last is built and built.shape == (0,)
    assert traced.gm(x).item() == pytest.approx(Last.forward(copy.deepcopy(model), x).item())
    assert "forward sets buffer 'last' to a tensor (4, 16)" in caplog.text


def test_an_in_place_method_on_a_view_nothing_else_reads_stays_an_fx_op():
    """``fc(x).view(b, 2, 8).relu_()``: the view is its tensor's last form, so fx's record is the step (only an
    update of a view whose tensor is read after it sends the model to torch.export)."""

    class LastView(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)

        def forward(self, x):
            h = self.a(x).view(x.size(0), 2, 8)
            h.relu_()
            return self.b(h.flatten(1)).pow(2).mean()

    model, x = LastView(), torch.randn(4, 8)
    traced = trace_model(model, (x,), name="last_view")
    assert traced.graph.meta["trace"] == "fx" and "relu_" in traced.graph.op_names
    assert traced.gm(x).item() == pytest.approx(model(x).item())


def test_a_no_grad_block_in_forward_computes_no_gradients_in_the_traced_step():
    """fx records a ``torch.no_grad()`` block's ops, not the grad mode: the EMA buffer's update took the
    activation's gradient, so the traced step's gradients were not eager's and the buffer, now part of the
    autograd graph, failed the second backward. The block's inputs are now detached: two traced steps give
    eager's losses and gradients. Updating a buffer through a view beside such a block is refused in one line
    (functionalizing the export would drop the block)."""
    model, (x,) = fst.ema_no_grad()
    eager = copy.deepcopy(model)
    traced = trace_model(model, (x,), name="ema")
    assert traced.graph.meta["trace"] == "fx"
    for _ in range(2):
        want, got = eager(x), traced.gm(x)
        want.backward()
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        grads = dict(eager.named_parameters())
        for name, p in traced.gm.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    with pytest.raises(TraceError, match=r"updates a tensor in place .* beside a torch.no_grad\(\) block"):
        trace_model(type(model)(through_view=True), (x,), name="ema_view")
