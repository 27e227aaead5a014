"""The batch of a step's inputs: which tensors carry it, and micro-batch ``k`` of ``M`` of them.

A step's inputs are tensors or containers of them (a dict as Hugging Face models take, lists, tuples, a
tokenizer's BatchEncoding or another UserDict: :func:`_as_container`): every tensor leaf with a dimension carries
the batch along dim 0; everything else (scalars, flags, 0-d tensors) is passed whole to every micro-batch. Every
consumer (the batch-mixing check of :mod:`graphs.microbatch`, the profiler, the engine, the stage split for
trainers) cuts micro-batches with these.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch.utils._pytree import (SUPPORTED_NODES, MappingKey, keystr, register_pytree_node,
                                 tree_flatten_with_path, tree_leaves, tree_map)

__all__ = ["batched_tensors", "check_split", "cloned_inputs", "input_batches", "inputs_restored", "inputs_to",
           "is_batched", "map_batched", "split_inputs"]


def _as_container(cls: type) -> None:
    """Register a ``collections.UserDict`` type (Hugging Face's ``BatchEncoding``, a tokenizer's output) with
    torch's pytree as a container of its values, rebuilt as the same type with the same attributes. torch takes
    such types for leaves, so the tensors in one were never split into micro-batches."""
    def flatten(d: collections.UserDict) -> tuple[list[Any], Any]:
        keys = tuple(d.data)
        return [d.data[k] for k in keys], (keys, {k: v for k, v in vars(d).items() if k != "data"})

    def unflatten(values: Any, context: Any) -> collections.UserDict:
        keys, attrs = context
        d = cls.__new__(cls)
        d.__dict__.update(attrs)
        d.data = dict(zip(keys, values))
        return d

    def flatten_with_keys(d: collections.UserDict) -> tuple[list[tuple[Any, Any]], Any]:
        values, context = flatten(d)
        return [(MappingKey(k), v) for k, v in zip(context[0], values)], context

    register_pytree_node(cls, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys,
                         serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


def _containers_registered(inputs: Any) -> Any:
    """``inputs``, after :func:`_as_container` of every ``UserDict`` type found in them (tuples, lists, dicts)."""
    stack = [inputs]
    while stack:
        x = stack.pop()
        if isinstance(x, (tuple, list)):
            stack.extend(x)
        elif isinstance(x, (dict, collections.UserDict)):
            if isinstance(x, collections.UserDict) and type(x) not in SUPPORTED_NODES:
                _as_container(type(x))
            stack.extend(x.values())
    return inputs


def is_batched(x: Any) -> bool:
    """Whether ``x`` is a leaf that carries the batch: a tensor with a dimension (dim 0 is the batch)."""
    return isinstance(x, torch.Tensor) and x.dim() > 0


def map_batched(fn: Any, inputs: Sequence[Any]) -> tuple[Any, ...]:
    """``inputs`` with ``fn`` applied to every batched tensor leaf (containers rebuilt, other leaves kept)."""
    return tuple(tree_map(lambda x: fn(x) if is_batched(x) else x, a) for a in _containers_registered(inputs))


def inputs_to(inputs: Sequence[Any], device: Any) -> tuple[Any, ...]:
    """``inputs`` with every tensor leaf (0-d ones too, which :func:`map_batched` leaves) moved to ``device``."""
    return tuple(tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, a)
                 for a in _containers_registered(inputs))


def batched_tensors(inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The batched tensor leaves of ``inputs`` in tree order: what a pipeline's first stage is fed
    (``torch.distributed.pipelining`` passes tensors only, and splits each along dim 0)."""
    return [x for x in tree_leaves(tuple(_containers_registered(inputs))) if is_batched(x)]


def cloned_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """``inputs`` with every tensor leaf cloned."""
    return tuple(tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, a)
                 for a in _containers_registered(inputs))


@contextlib.contextmanager
def inputs_restored(inputs: Sequence[Any]) -> Iterator[None]:
    """Every tensor leaf of ``inputs`` holds its values again afterwards. A step may write its batch in place
    (``x.mul_(2)`` on an input); tracing, profiling and the batch-mixing check run it many times, each on the batch
    as given, and leave the caller's batch as it was."""
    saved = [(x, x.detach().clone()) for x in tree_leaves(tuple(_containers_registered(inputs)))
             if isinstance(x, torch.Tensor)]
    try:
        yield
    finally:
        with torch.no_grad():
            for x, copy in saved:
                x.copy_(copy)


def input_batches(inputs: Sequence[Any]) -> list[tuple[str, int]]:
    """``(where, batch)`` of every batched tensor leaf of ``inputs``: ``where`` names it (``input 0``,
    ``input 0['input_ids']``)."""
    leaves, _ = tree_flatten_with_path(tuple(_containers_registered(inputs)))
    return [(f"input {path[0].idx}{keystr(path[1:])}", int(x.shape[0])) for path, x in leaves if is_batched(x)]


def check_split(inputs: Sequence[Any], parts: int) -> None:
    """One-line ``ValueError`` unless every batched input splits into ``parts`` equal micro-batches."""
    if parts < 1:
        raise ValueError(f"microbatches must be >= 1, got {parts}")
    for where, b in input_batches(inputs):
        if b % parts:
            raise ValueError(f"{where} has batch {b}, not divisible into {parts} micro-batches")


def split_inputs(inputs: Sequence[Any], parts: int, index: int) -> tuple[Any, ...]:
    """Micro-batch ``index`` of ``parts`` equal ones: every batched tensor leaf's slice along dim 0 (a view); a
    batch that does not split evenly is :func:`check_split`'s one-line ``ValueError``."""
    check_split(inputs, parts)
    if parts <= 1:
        return tuple(inputs)
    return map_batched(lambda x: x.narrow(0, index * (x.shape[0] // parts), x.shape[0] // parts), inputs)
