"""The small interface every placement policy implements, and the registries of policies and algorithms.

A policy maps a :class:`PolicyInput` (the torch form of a static :class:`envs.problem.PlacementProblem`, built once
per problem) to a distribution over complete placements — one device per group, in group order — and can

- :meth:`PlacementPolicy.sample` ``S`` placements at once (``actions`` ``LongTensor[S, G]`` with their
  ``log_prob[S]`` and ``entropy[S]``, differentiable), greedily or from a seeded ``torch.Generator``;
- :meth:`PlacementPolicy.log_prob` of given placements (for PPO-style re-evaluation).

Both apply the memory mask autoregressively (:class:`MemoryMask`, the environment's rule: a device is allowed
when the group still fits; all devices when none fits), so a policy and ``env.action_masks()`` agree step by step.
ColocRL's seq2seq (:mod:`policies.seq2seq`), and later the GNN and hierarchical policies, implement it; REINFORCE
(:mod:`policies.reinforce`) is written against it only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from envs.problem import PlacementProblem

if TYPE_CHECKING:
    pass


@dataclass(frozen=True, kw_only=True, eq=False)
class PolicyInput:
    """Torch tensors of one :class:`~envs.problem.PlacementProblem` (float32 unless noted)."""

    node_features: Tensor
    """``(G, F)``: the static group features followed by the ``D`` per-device time columns."""
    kind_ids: Tensor
    """``(G,)`` int64 op-kind ids (:func:`envs.problem.kind_id`)."""
    edge_index: Tensor
    """``(2, E)`` int64 group edges (producer, consumer)."""
    edge_features: Tensor
    """``(E, 2)``."""
    device_features: Tensor
    """``(D, 4)`` static device features."""
    time_s: Tensor
    """``(G, D)`` float64 seconds of each group on each device."""
    mem_bytes: Tensor
    """``(G,)`` float64 resident bytes per group."""
    capacity_bytes: Tensor
    """``(D,)`` float64 device memory."""
    problem: PlacementProblem
    """The problem itself, for policies that track a schedule estimate (:class:`envs.problem.FinishEstimate`)."""
    cache: dict[str, Any] = field(default_factory=dict)
    """Per-policy derived tensors (e.g. neighbour tables), computed once per input."""

    @property
    def num_groups(self) -> int:
        return int(self.kind_ids.shape[0])

    @property
    def num_devices(self) -> int:
        return int(self.capacity_bytes.shape[0])

    @classmethod
    def from_problem(cls, problem: PlacementProblem, device: str | torch.device = "cpu") -> "PolicyInput":
        f32 = dict(dtype=torch.float32, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            node_features=torch.as_tensor(np.concatenate([problem.node_features, problem.node_device_time], axis=1),
                                          **f32),
            kind_ids=torch.as_tensor(problem.kind_ids, dtype=torch.int64, device=device),
            edge_index=torch.as_tensor(problem.edge_index, dtype=torch.int64, device=device),
            edge_features=torch.as_tensor(problem.edge_features, **f32),
            device_features=torch.as_tensor(problem.device_features, **f32),
            time_s=torch.as_tensor(problem.time_s, **f64),
            mem_bytes=torch.as_tensor(problem.mem_bytes, **f64),
            capacity_bytes=torch.as_tensor(problem.capacity_bytes, **f64),
            problem=problem,
        )


@dataclass(frozen=True)
class PolicySample:
    """``S`` placements with their log-probabilities and entropies (summed over the ``G`` decisions)."""

    actions: Tensor
    """``(S, G)`` int64 device per group."""
    log_prob: Tensor
    """``(S,)``."""
    entropy: Tensor
    """``(S,)``: sum over groups of the entropy of each (masked) decision."""
    view: Tensor | None = None
    """``(S,)`` int64: the view (index into :meth:`PlacementPolicy.views`) each placement was drawn or scored in,
    for a policy that trains in several at once; ``None`` for one view."""


class MemoryMask:
    """The environment's memory mask, tracked for ``S`` partial placements at once."""

    def __init__(self, inp: PolicyInput, num_samples: int) -> None:
        self.inp = inp
        self.used = torch.zeros(num_samples, inp.num_devices, dtype=torch.float64, device=inp.mem_bytes.device)
        self._rows = torch.arange(num_samples, device=inp.mem_bytes.device)

    def mask(self, group: int) -> Tensor:
        """``(S, D)`` bool: devices that still fit group ``group`` (every device in rows where none does)."""
        fits = self.used + self.inp.mem_bytes[group] <= self.inp.capacity_bytes
        return fits | ~fits.any(dim=1, keepdim=True)

    def place(self, group: int, actions: Tensor) -> None:
        self.used[self._rows, actions] += self.inp.mem_bytes[group]


def masked_categorical(logits: Tensor, mask: Tensor, *, actions: Tensor | None = None, greedy: bool = False,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Choose (or score given ``actions``) from ``logits`` restricted to ``mask``; returns
    ``(actions, log_prob, entropy)``, each ``(S,)``."""
    logits = logits.masked_fill(~mask, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    entropy = -(p * logp.masked_fill(~mask, 0.0)).sum(dim=-1)
    if actions is None:
        if greedy:
            actions = logp.argmax(dim=-1)
        else:
            actions = torch.multinomial(p.detach(), 1, generator=generator).squeeze(1)
    return actions, logp.gather(1, actions.unsqueeze(1)).squeeze(1), entropy


class PlacementPolicy(nn.Module):
    """A distribution over placements of one problem's groups (see the module docstring)."""

    def sample(self, inp: PolicyInput, num_samples: int, *, greedy: bool = False,
               generator: torch.Generator | None = None) -> PolicySample:
        raise NotImplementedError

    def log_prob(self, inp: PolicyInput, actions: Tensor, *, view: Tensor | None = None) -> PolicySample:
        """Log-probability and entropy of given placements ``actions`` ``(S, G)``, each in its ``view`` (``(S,)``,
        as :attr:`PolicySample.view`; ``None``: the current one)."""
        raise NotImplementedError

    def views(self) -> Iterator[str]:
        """The ways this policy can read a problem, entered one after another (a generator that sets each up
        and yields its name); zero-shot placement samples in each and keeps the best. One by default."""
        yield "default"


class AutoregressivePolicy(PlacementPolicy):
    """A policy that decodes one group at a time: sampling and scoring share one ``_decode`` (teacher-forced
    when ``actions`` is given), so the two can never disagree."""

    def _decode(self, inp: PolicyInput, num_samples: int, *, actions: Tensor | None, greedy: bool,
                generator: torch.Generator | None, view: Tensor | None = None) -> PolicySample:
        raise NotImplementedError

    def sample(self, inp: PolicyInput, num_samples: int, *, greedy: bool = False,
               generator: torch.Generator | None = None) -> PolicySample:
        return self._decode(inp, num_samples, actions=None, greedy=greedy, generator=generator)

    def log_prob(self, inp: PolicyInput, actions: Tensor, *, view: Tensor | None = None) -> PolicySample:
        actions = torch.as_tensor(actions, dtype=torch.int64)
        if actions.dim() != 2 or actions.shape[1] != inp.num_groups:
            raise ValueError(f"actions must be (S, {inp.num_groups}), got {tuple(actions.shape)}")
        return self._decode(inp, actions.shape[0], actions=actions, greedy=False, generator=None, view=view)


def imitate(policy: PlacementPolicy, inp: PolicyInput, actions: Tensor, *, max_steps: int = 300, lr: float = 3e-3,
            target_nll: float = 0.1) -> tuple[int, float]:
    """Behaviour cloning as a warm start: raise ``log p(actions)`` (``(K, G)`` placements to imitate) with Adam
    until the mean negative log-likelihood per decision is below ``target_nll`` nats (the demonstrated device then
    has probability ~0.9 at each step, so sampling still explores) or ``max_steps``. Returns ``(steps, nll)``.
    A run that starts this way must say so (it is not learning from scratch)."""
    actions = torch.as_tensor(actions, dtype=torch.int64).reshape(-1, inp.num_groups)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    nll = float("inf")
    for step in range(1, max_steps + 1):
        loss = -policy.log_prob(inp, actions).log_prob.mean() / max(1, inp.num_groups)
        nll = float(loss.detach())
        if nll < target_nll:
            return step - 1, nll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return max_steps, nll
