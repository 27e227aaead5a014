"""How tensors travel between workers (one flat buffer per message) and the direct autograd backward call."""

from __future__ import annotations

from typing import Sequence

import torch

from placer.engine.program import ValueMeta

__all__ = ["WIRE_DTYPE", "backward", "wire", "split", "unwire"]

WIRE_DTYPE = {torch.bool: torch.uint8}  # gloo has no bool

try:  # the C++ engine directly: torch.autograd.backward re-validates every gradient (~20 us per call here)
    from torch.autograd.variable import Variable as _Variable

    _run_backward = _Variable._execution_engine.run_backward
except (ImportError, AttributeError):  # pragma: no cover - other torch versions
    _run_backward = None


def backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``torch.autograd.backward(tensors, grads)`` for gradients already of the right shape, dtype and device."""
    if _run_backward is None:  # pragma: no cover
        torch.autograd.backward(tensors, grads)
    else:
        _run_backward(tuple(tensors), tuple(grads), False, False, (), True, True)


def wire(ts: Sequence[torch.Tensor], comm_device: torch.device) -> torch.Tensor:
    """The leaves of one message as one flat, contiguous buffer of a dtype gloo knows, on the comm device."""
    t = ts[0].detach().reshape(-1) if len(ts) == 1 else torch.cat([x.detach().reshape(-1) for x in ts])
    if t.dtype in WIRE_DTYPE:
        t = t.to(WIRE_DTYPE[t.dtype])
    if t.device != comm_device:
        t = t.to(comm_device)
    return t.contiguous()


def split(buf: torch.Tensor, meta: ValueMeta, leaves: Sequence[int]) -> list[torch.Tensor]:
    """Views of a received flat buffer, one per leaf, in the leaves' shapes."""
    if len(leaves) == 1:
        return [buf.view(meta.leaves[leaves[0]].shape).detach()]  # detached: an autograd leaf, not a view
    out, at = [], 0
    for k in leaves:
        shape = meta.leaves[k].shape
        n = 1
        for d in shape:
            n *= d
        out.append(buf[at:at + n].view(shape).detach())
        at += n
    return out


def unwire(buf: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if buf.dtype != dtype:
        buf = buf.to(dtype)
    if buf.device != device:
        buf = buf.to(device)
    return buf
