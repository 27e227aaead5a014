"""The hierarchical planner (Mirhoseini et al., "A Hierarchical Model for Device Placement", ICLR 2018).

A **grouper** — a feed-forward network with a softmax over ``groups`` learned groups — assigns every unit to a
group, and a **placer** — a sequence-to-sequence network as in ColocRL — places the groups; both are sampled
together and trained jointly with policy gradient, so the graph need not be grouped by hand. The units here are
the environment's groups (:mod:`envs.problem`: ColocRL co-location groups, by default up to 256 of them, i.e.
nearly ops on small graphs); the policy's output is still one device per unit, so :mod:`policies.reinforce`
trains it unchanged: the log-probability of a sample is the grouper's plus the placer's.

As in the paper, a group's embedding is built from its members: the sum of their features (compute, bytes,
parameters, memory, per-device time; the paper used op-type counts and output shapes) and the group's row of the
group adjacency matrix (bytes between groups, ``log1p``-scaled). The placer is a bidirectional-LSTM encoder over
the groups and an attentional LSTM decoder emitting a device per group, masked by memory at the group level.

The grouping is latent, so the probability of a given per-unit placement is a sum over groupings;
:meth:`HierarchicalPolicy.log_prob` (used by self-imitation and warm starts) scores its most likely term only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from envs.problem import KIND_BUCKETS, PlacementProblem
from policies.base import PlacementPolicy, PolicyInput, PolicySample, masked_categorical
from policies.registry import register_policy


class HierarchicalPolicy(PlacementPolicy):
    """Grouper (feed-forward softmax over ``groups``) + seq2seq placer, sampled jointly (module docstring)."""

    def __init__(self, *, node_dim: int, num_devices: int, groups: int = 16, hidden: int = 64, embed: int = 32,
                 kind_embed: int = 8, logit_clip: float = 5.0) -> None:
        super().__init__()
        if groups < 1 or num_devices < 1 or hidden < 1:
            raise ValueError("groups, num_devices and hidden must be positive")
        self.groups, self.num_devices, self.logit_clip = groups, num_devices, logit_clip
        # ---- grouper
        self.kind_embedding = nn.Embedding(KIND_BUCKETS, kind_embed)
        self.grouper = nn.Sequential(nn.Linear(node_dim + kind_embed, hidden), nn.ReLU(), nn.Linear(hidden, groups))
        # ---- placer
        self.group_embed = nn.Sequential(nn.Linear(node_dim + 1 + 2 * groups, embed), nn.Tanh())
        self.encoder = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.enc_proj = nn.Linear(2 * hidden, hidden)
        self.device_embedding = nn.Embedding(num_devices + 1, embed)  # + start token
        self.decoder = nn.LSTMCell(embed + hidden, hidden)
        self.att_query = nn.Linear(hidden, hidden)
        self.out = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, num_devices))

    def _clip(self, logits: Tensor) -> Tensor:
        return self.logit_clip * torch.tanh(logits / self.logit_clip) if self.logit_clip > 0 else logits

    def _grouper_logits(self, inp: PolicyInput) -> Tensor:
        return self._clip(self.grouper(torch.cat([inp.node_features, self.kind_embedding(inp.kind_ids)], dim=1)))

    def _run(self, inp: PolicyInput, num_samples: int, *, greedy: bool = False,
             generator: torch.Generator | None = None, assign: Tensor | None = None,
             group_devices: Tensor | None = None, counted: Tensor | None = None) -> PolicySample:
        """Sample (or, given ``assign`` ``(S, N)`` and ``group_devices`` ``(S, K)``, score) groupings and group
        devices; decisions of groups where ``counted`` is False are taken greedily and not scored."""
        if inp.num_devices != self.num_devices:
            raise ValueError(f"policy was built for {self.num_devices} devices, problem has {inp.num_devices}")
        s, n, k, d = num_samples, inp.num_groups, self.groups, self.num_devices
        x = inp.node_features
        # ---------------------------------------------------------------- grouper: a group per unit
        g_logits = self._grouper_logits(inp)  # (N, K)
        flat = g_logits.unsqueeze(0).expand(s, -1, -1).reshape(s * n, k)
        assign, g_lp, g_ent = masked_categorical(flat, torch.ones_like(flat, dtype=torch.bool), greedy=greedy,
                                                 generator=generator,
                                                 actions=None if assign is None else assign.reshape(-1))
        assign = assign.view(s, n)
        g_lp, g_ent = g_lp.view(s, n).sum(1), g_ent.view(s, n).sum(1)
        # ---------------------------------------------------------------- group embeddings from their members
        one_hot = torch.nn.functional.one_hot(assign, k).to(x.dtype)  # (S, N, K)
        members = one_hot.transpose(1, 2)  # (S, K, N)
        feats = members @ x  # (S, K, F): summed member features
        count = members.sum(2, keepdim=True) / max(1, n)
        src, dst = inp.edge_index
        w = torch.expm1(inp.edge_features[:, 0]) if inp.edge_features.numel() else torch.zeros(0)
        adj = torch.zeros(s, k, k, dtype=x.dtype)
        if src.numel():  # bytes (relative to the mean edge) between groups, both directions
            adj.index_put_((torch.arange(s).repeat_interleave(src.numel()), assign[:, src].reshape(-1),
                            assign[:, dst].reshape(-1)), w.to(x.dtype).repeat(s), accumulate=True)
        adj = torch.log1p(adj)
        emb = self.group_embed(torch.cat([feats, count, adj, adj.transpose(1, 2)], dim=2))  # (S, K, E)
        # ---------------------------------------------------------------- placer: seq2seq over the groups
        enc, _ = self.encoder(emb)
        states = self.enc_proj(enc)  # (S, K, H)
        group_mem = members.to(torch.float64) @ inp.mem_bytes  # (S, K)
        used = torch.zeros(s, d, dtype=torch.float64)
        rows = torch.arange(s)
        hdim = states.shape[2]
        h = torch.zeros(s, hdim, dtype=x.dtype)
        c = torch.zeros_like(h)
        prev = torch.full((s,), d, dtype=torch.int64)
        devices, p_lp, p_ent = [], torch.zeros(s), torch.zeros(s)
        for t in range(k):
            h, c = self.decoder(torch.cat([self.device_embedding(prev), states[:, t]], dim=1), (h, c))
            att = torch.softmax((states @ self.att_query(h).unsqueeze(2)).squeeze(2) * hdim ** -0.5, dim=1)
            context = (att.unsqueeze(2) * states).sum(1)
            logits = self._clip(self.out(torch.cat([h, context], dim=1)))
            fits = used + group_mem[:, t:t + 1] <= inp.capacity_bytes
            mask = fits | ~fits.any(dim=1, keepdim=True)
            forced = None
            if group_devices is not None:
                assert counted is not None
                free = logits.masked_fill(~mask, float("-inf")).argmax(dim=1)
                forced = torch.where(counted[:, t], group_devices[:, t], free)
                # a given placement may overflow memory; score it anyway rather than with -inf
                mask = mask | torch.nn.functional.one_hot(forced, d).bool()
            a, lp, ent = masked_categorical(logits, mask, greedy=greedy, generator=generator, actions=forced)
            if counted is not None:
                lp = lp * counted[:, t]
            used = used.index_put((rows, a), group_mem[:, t], accumulate=True)
            devices.append(a)
            p_lp, p_ent = p_lp + lp, p_ent + ent
            prev = a
        dev_of_group = torch.stack(devices, dim=1)  # (S, K)
        actions = dev_of_group.gather(1, assign)
        return PolicySample(actions, g_lp + p_lp, g_ent + p_ent)

    def sample(self, inp: PolicyInput, num_samples: int, *, greedy: bool = False,
               generator: torch.Generator | None = None) -> PolicySample:
        return self._run(inp, num_samples, greedy=greedy, generator=generator)

    def log_prob(self, inp: PolicyInput, actions: Tensor, *, view: Tensor | None = None) -> PolicySample:
        """Log-probability of the most likely grouping path that yields ``actions`` (module docstring): each used
        device gets a distinct group (greedily, by the grouper's summed log-probabilities of its units), unused
        groups are placed greedily and not scored. A lower bound of the marginal, enough for self-imitation and
        warm starts."""
        actions = torch.as_tensor(actions, dtype=torch.int64)
        n, k = inp.num_groups, self.groups
        if actions.dim() != 2 or actions.shape[1] != n:
            raise ValueError(f"actions must be (S, {n}), got {tuple(actions.shape)}")
        with torch.no_grad():
            logp = torch.log_softmax(self._grouper_logits(inp), dim=1)  # (N, K)
        assign = torch.zeros_like(actions)
        group_devices = torch.zeros(actions.shape[0], k, dtype=torch.int64)
        counted = torch.zeros(actions.shape[0], k, dtype=torch.bool)
        for row, placement in enumerate(actions):
            used = placement.unique()
            if used.numel() > k:
                raise ValueError(f"a placement on {used.numel()} devices needs at least that many groups "
                                 f"(the policy has {k})")
            score = torch.stack([logp[placement == dev].sum(0) for dev in used])  # (U, K)
            for _ in range(used.numel()):  # greedy matching of devices to groups
                i, g = divmod(int(score.argmax()), k)
                assign[row, placement == used[i]] = g
                group_devices[row, g], counted[row, g] = used[i], True
                score[i, :], score[:, g] = float("-inf"), float("-inf")
        return self._run(inp, actions.shape[0], assign=assign, group_devices=group_devices, counted=counted)


@register_policy("hierarchical")
def make_hierarchical(problem: PlacementProblem, **hparams: Any) -> HierarchicalPolicy:
    """The hierarchical planner sized for ``problem`` (hyperparameters: see :class:`HierarchicalPolicy`)."""
    node_dim = problem.node_features.shape[1] + problem.node_device_time.shape[1]
    return HierarchicalPolicy(node_dim=node_dim, num_devices=problem.num_devices, **hparams)
