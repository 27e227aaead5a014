"""A graph-neural-network placement policy (Placeto, Addanki et al., NeurIPS 2019; GDP, Zhou et al., 2019).

GraphSAGE message passing (Hamilton et al., NeurIPS 2017) over the *group* graph embeds every group from its
static, scale-free features (:data:`envs.problem.NODE_STATIC_FEATURES` plus the mean and the largest of its
per-device time columns). As in Placeto, messages flow separately along the data edges and against them (a
group's producers and its consumers matter differently), and every layer is residual with a layer norm.

A per-group device head then scores each device ``d`` for the group ``t`` being placed from

- the group's embedding and the mean embedding of the graph;
- the pair features :data:`PAIR_FEATURES`: the group's time on ``d``, ``d``'s static features, the compute and
  memory already placed on ``d`` (the environment's load columns), when the group would finish on ``d`` given
  the groups placed so far (a list-schedule estimate, :class:`envs.problem.FinishEstimate`, as HEFT and ETF
  rank devices) and whether that estimate is shown, and the share of the traffic between the group and its
  already-placed neighbours (producers or consumers) that those on ``d`` carry (the communication a choice
  would save).

``finish_dropout`` hides the finish estimate (and says so in ``finish_shown``) from a share of the training
samples, so that one policy learns to place both with and without it (REINFORCE trains the two views as two
policies sharing weights, see :mod:`policies.reinforce`); :func:`placer.app.place.place_zero_shot` tries both views.
The estimate ranks devices well where list scheduling does (Inception-V3) and misleads where it does
not (NMT, whose output projection is called once per decoder step), and a graph the policy never saw does not say
which kind it is.

The head is shared across devices, so the policy has no parameter that depends on the number of groups, edges
or devices: one set of weights places any graph on any cluster (what zero-shot placement needs).

The same network serves two algorithms:

- :class:`GNNPolicy` implements :class:`policies.base.PlacementPolicy` for REINFORCE: the graph is embedded once
  per problem and the head is applied autoregressively, tracking loads, memory and neighbours for ``S`` samples;
- :class:`GNNExtractor` is a stable-baselines3 ``BaseFeaturesExtractor`` reading the environment's padded ``Dict``
  observation (batched, with int arrays arriving as float32 and ``current_group`` one-hot or as an index with an
  extra dimension) for sb3-contrib's ``MaskablePPO`` (:mod:`policies.ppo`). It computes the same pair features
  from the observation, so both views give the same logits for the same partial placement.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn

from envs.problem import (DEVICE_STATIC_FEATURES, NODE_STATIC_FEATURES, FinishEstimate, PlacementProblem,
                          device_load_features)
from policies.base import (AutoregressivePolicy, MemoryMask, PolicyInput, PolicySample, masked_categorical)
from policies.registry import register_policy

NS = len(NODE_STATIC_FEATURES)
NODE_IN = NS + 2
"""Encoder input: the static group features, then the mean and the largest per-device time (any device count)."""
PAIR_FEATURES = ("time_on_device", *DEVICE_STATIC_FEATURES, "compute_load", "memory_used", "finish_estimate",
                 "finish_shown", "input_bytes_here")
"""Per (group, device) features of the device head."""
PAIR_DIM = len(PAIR_FEATURES)


def node_inputs(static: Tensor, device_time: Tensor, present: Tensor) -> Tensor:
    """``(..., NODE_IN)`` encoder inputs from ``(..., NS)`` static features and ``(..., Dm)`` device-time columns
    of which ``present`` ``(..., Dm)`` (broadcastable) marks the real devices."""
    present = present.to(device_time.dtype)
    mean = (device_time * present).sum(-1, keepdim=True) / present.sum(-1, keepdim=True).clamp_min(1.0)
    top = device_time.masked_fill(present <= 0, float("-inf")).amax(-1, keepdim=True).clamp_min(0.0)
    return torch.cat([static, mean, top], dim=-1)


class GraphEncoder(nn.Module):
    """``layers`` residual GraphSAGE layers, each summing a pass along the edges and one against them."""

    def __init__(self, *, in_dim: int = NODE_IN, hidden: int = 64, layers: int = 3) -> None:
        super().__init__()
        if hidden < 1 or layers < 0:
            raise ValueError(f"GraphEncoder needs hidden >= 1 and layers >= 0, got {hidden}, {layers}")
        # imported here, not at the top: torch_geometric takes ~2 s to import (it pulls in transformers through
        # torch_geometric.llm), which every CLI command that reads the policy registry would otherwise pay
        from torch_geometric.nn import SAGEConv

        self.inp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.fwd = nn.ModuleList(SAGEConv(hidden, hidden, aggr="mean") for _ in range(layers))
        self.bwd = nn.ModuleList(SAGEConv(hidden, hidden, aggr="mean") for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Node embeddings ``(N, hidden)`` of ``x`` ``(N, in_dim)`` over directed edges ``(2, E)``."""
        h = self.inp(x)
        rev = edge_index.flip(0)
        for fwd, bwd, norm in zip(self.fwd, self.bwd, self.norms):
            h = norm(h + torch.relu(fwd(h, edge_index) + bwd(h, rev)))
        return h


class DeviceHead(nn.Module):
    """Scores every device for one group: an MLP over [group embedding, graph embedding, pair features]."""

    def __init__(self, *, hidden: int = 64, logit_clip: float = 5.0) -> None:
        super().__init__()
        self.logit_clip = logit_clip
        self.mlp = nn.Sequential(nn.Linear(2 * hidden + PAIR_DIM, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, node_h: Tensor, graph_h: Tensor, pair: Tensor) -> Tensor:
        """``(B, D)`` logits from ``(B, H)``, ``(B, H)`` and ``(B, D, PAIR_DIM)``."""
        d = pair.shape[1]
        z = torch.cat([node_h.unsqueeze(1).expand(-1, d, -1), graph_h.unsqueeze(1).expand(-1, d, -1), pair], dim=-1)
        logits = self.mlp(z).squeeze(-1)
        # the hierarchical planner's clipping keeps early policies from collapsing on one device
        return self.logit_clip * torch.tanh(logits / self.logit_clip) if self.logit_clip > 0 else logits


class GNNPolicy(AutoregressivePolicy):
    """GraphSAGE encoder + shared device head (module docstring); no size-dependent parameters."""

    def __init__(self, *, hidden: int = 64, layers: int = 3, logit_clip: float = 5.0,
                 temperature: float = 1.0, finish_dropout: float = 0.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= finish_dropout < 1.0:
            raise ValueError(f"finish_dropout must be in [0, 1), got {finish_dropout}")
        self.hidden, self.temperature, self.finish_dropout = hidden, temperature, finish_dropout
        self.finish_feature = True
        """Whether the head sees the ``finish_estimate`` column; False reads it as 0 (a policy trained with
        ``finish_dropout > 0`` has seen both views; :func:`placer.app.place.place_zero_shot` tries both)."""
        self.encoder = GraphEncoder(hidden=hidden, layers=layers)
        self.head = DeviceHead(hidden=hidden, logit_clip=logit_clip)

    def embed(self, inp: PolicyInput) -> tuple[Tensor, Tensor]:
        """Group embeddings ``(G, H)`` and the graph's mean embedding ``(H,)``."""
        d = inp.num_devices
        x = node_inputs(inp.node_features[:, :NS], inp.node_features[:, NS:NS + d],
                        torch.ones(d, device=inp.node_features.device))
        h = self.encoder(x, inp.edge_index)
        return h, h.mean(dim=0)

    def views(self) -> Iterator[str]:
        """With the finish estimate shown, then, for a policy trained with ``finish_dropout``, hidden."""
        shown = self.finish_feature
        try:
            self.finish_feature = True
            yield "finish shown"
            if self.finish_dropout > 0:
                self.finish_feature = False
                yield "finish hidden"
        finally:
            self.finish_feature = shown

    def finish_keep(self, num_samples: int, *, sampling: bool, generator: torch.Generator | None = None,
                    view: Tensor | None = None) -> Tensor:
        """``(S, 1)``: 1 where a sample sees the ``finish_estimate`` column, 0 where it reads 0 — hidden for all
        when :attr:`finish_feature` is off, and for each training sample with probability ``finish_dropout``.
        Scoring given placements (``log_prob``: REINFORCE's self-imitation of its best placements) draws no
        dropout: each is scored in its ``view`` (0 shown, 1 hidden, as :meth:`views` lists them), or in the
        current one."""
        if view is not None:
            return (torch.as_tensor(view).reshape(num_samples, 1) == 0).float()
        keep = torch.full((num_samples, 1), float(self.finish_feature))
        if self.training and sampling and self.finish_dropout > 0:
            keep = keep.masked_fill(torch.rand(num_samples, 1, generator=generator) < self.finish_dropout, 0.0)
        return keep

    @staticmethod
    def _neighbours(inp: PolicyInput) -> list[tuple[Tensor, Tensor]]:
        """Per group ``t``: its neighbour groups placed before it (producers and consumers ``< t``) and the weights
        (``log1p`` bytes over the mean) of the edges joining them."""
        if "gnn_neighbours" not in inp.cache:
            src, dst = inp.edge_index
            w = inp.edge_features[:, 0] if inp.edge_features.numel() else torch.zeros(0)
            out = []
            for g in range(inp.num_groups):
                prod, cons = (dst == g) & (src < g), (src == g) & (dst < g)
                out.append((torch.cat([src[prod], dst[cons]]), torch.cat([w[prod], w[cons]])))
            inp.cache["gnn_neighbours"] = out
        return inp.cache["gnn_neighbours"]

    def _decode(self, inp: PolicyInput, num_samples: int, *, actions: Tensor | None, greedy: bool,
                generator: torch.Generator | None, view: Tensor | None = None) -> PolicySample:
        h, pool = self.embed(inp)
        s, g, d = num_samples, inp.num_groups, inp.num_devices
        dt = h.dtype
        memory = MemoryMask(inp, s)
        time_used = torch.zeros(s, d, dtype=inp.time_s.dtype, device=h.device)
        device_total = inp.time_s.sum(dim=0).clamp_min(1e-30)
        capacity = inp.capacity_bytes
        dev = inp.device_features.to(dt).unsqueeze(0).expand(s, -1, -1)
        dev_time = inp.node_features[:, NS:NS + d]
        rows = torch.arange(s, device=h.device)
        chosen = torch.zeros(s, g, dtype=torch.int64, device=h.device)
        neighbours = self._neighbours(inp)
        finish = FinishEstimate(inp.problem, s)
        keep = self.finish_keep(s, sampling=actions is None and not greedy, generator=generator, view=view).to(h)
        chosen_np = np.zeros((s, g), dtype=np.int64)
        pool_s = pool.unsqueeze(0).expand(s, -1)
        logps, ents = [], []
        for t in range(g):
            src, w = neighbours[t]
            if src.numel():
                here = torch.nn.functional.one_hot(chosen[:, src], d).to(dt)  # (S, k, D)
                affinity = (w.to(dt)[None, :, None] * here).sum(1) / w.sum().clamp_min(1e-8)
            else:
                affinity = torch.zeros(s, d, dtype=dt, device=h.device)
            est = finish.estimates(t, chosen_np)
            late = torch.as_tensor(finish.feature(est), dtype=dt, device=h.device) * keep
            load, mem_used = device_load_features(time_used, memory.used, device_total, capacity)
            pair = torch.cat([dev_time[t].expand(s, d).unsqueeze(-1), dev, load.to(dt).unsqueeze(-1),
                              mem_used.to(dt).unsqueeze(-1), late.unsqueeze(-1),
                              keep.expand(s, d).unsqueeze(-1), affinity.unsqueeze(-1)], dim=-1)
            logits = self.head(h[t].expand(s, -1), pool_s, pair) / self.temperature
            a, lp, ent = masked_categorical(logits, memory.mask(t), actions=None if actions is None else actions[:, t],
                                            greedy=greedy, generator=generator)
            memory.place(t, a)
            time_used = time_used.index_put((rows, a), inp.time_s[t, a], accumulate=True)
            chosen[:, t] = a
            chosen_np[:, t] = a.cpu().numpy()
            finish.place(t, chosen_np[:, t])
            logps.append(lp)
            ents.append(ent)
        return PolicySample(chosen, torch.stack(logps, dim=1).sum(dim=1), torch.stack(ents, dim=1).sum(dim=1),
                            view=(keep[:, 0] == 0).long() if self.finish_dropout > 0 else None)



@register_policy("gnn")
def make_gnn(problem: PlacementProblem, **hparams: Any) -> GNNPolicy:
    """The GNN policy (hyperparameters: see :class:`GNNPolicy`). ``problem`` is not needed: the same weights fit
    every problem."""
    return GNNPolicy(**hparams)


# ============================================================================================== SB3 extractor
def current_index(current: Tensor, num_groups: int) -> Tensor:
    """``(B,)`` int64 current group from SB3's view of a ``Discrete(num_groups)`` entry: one-hot ``(B, Gm)`` (what
    ``preprocess_obs`` makes), one-hot with an extra dimension ``(B, 1, Gm)``, or an index ``(B,)`` / ``(B, 1)``."""
    b = current.shape[0]
    flat = current.reshape(b, -1)
    if flat.shape[1] == num_groups:
        return flat.argmax(dim=1)
    if flat.shape[1] == 1:
        return flat[:, 0].round().long()
    raise ValueError(f"current_group of shape {tuple(current.shape)} fits neither an index nor a one-hot of "
                     f"{num_groups} groups")


class GNNExtractor(BaseFeaturesExtractor):
    """SB3 features extractor over :class:`envs.placement_env.PlacementEnv` observations (module docstring).

    Features: ``[group embedding (H), graph embedding (H), device logits (Dm)]``; the last ``Dm`` are the shared
    device head's logits, which :class:`policies.ppo.GNNMaskablePolicy` uses directly as the action logits, so the
    PPO policy is the same function as :class:`GNNPolicy`. ``network`` may be an existing :class:`GNNPolicy`
    whose encoder and head are then shared (the trainer checkpoints them as "the policy").
    """

    def __init__(self, observation_space: spaces.Dict, *, hidden: int = 64, layers: int = 3,
                 network: GNNPolicy | None = None) -> None:
        self.max_groups = int(observation_space["node_mask"].shape[0])
        self.max_devices = int(observation_space["action_mask"].shape[0])
        self.max_edges = int(observation_space["edge_mask"].shape[0])
        self.node_dim = int(observation_space["node_features"].shape[0]) // self.max_groups
        if self.node_dim != NS + 2 * self.max_devices + 2:
            raise ValueError(f"observation has {self.node_dim} node columns; expected {NS + 2 * self.max_devices + 2}")
        net = network if network is not None else GNNPolicy(hidden=hidden, layers=layers)
        super().__init__(observation_space, features_dim=2 * net.hidden + self.max_devices)
        self.net = net
        self._cached: tuple[Any, Tensor, Tensor, Tensor, Tensor] | None = None
        """``(parameter versions, xin, edge_index, edge_mask, embeddings)`` of the last graph embedded without
        gradients: a rollout step of the same episode (same graph, same weights) reuses it."""

    def _embed(self, xin: Tensor, ei: Tensor, edge_mask: Tensor) -> Tensor:
        """Node embeddings ``(B, Gm, H)``. The encoder's inputs are the graph's static features only (the
        partial placement enters through the pair features), so each distinct graph of the batch is embedded
        once — a PPO minibatch of one graph runs the encoder on one graph instead of ``B`` copies — and a
        rollout step reuses the previous step's embedding while the weights are unchanged. Exact: samples are
        grouped by comparing their inputs, not by a hash."""
        b, gm = xin.shape[:2]
        versions = tuple(p._version for p in self.net.encoder.parameters())
        c = self._cached
        if (not torch.is_grad_enabled() and c is not None and c[0] == versions and c[1].shape == xin.shape[1:]
                and bool((xin == c[1]).all()) and bool((ei == c[2]).all()) and bool((edge_mask == c[3]).all())):
            return c[4].unsqueeze(0).expand(b, -1, -1)
        same = ((xin == xin[:1]).flatten(1).all(1) & (ei == ei[:1]).flatten(1).all(1)
                & (edge_mask == edge_mask[:1]).all(1))
        if bool(same.all()):  # one graph in the batch (always, when training on one graph)
            m = edge_mask[0]
            h = self.net.encoder(xin[0], ei[0][:, m]).unsqueeze(0).expand(b, -1, -1)
        else:  # several graphs: embed the whole batch as one disjoint union (padding nodes have no edges)
            offset = (torch.arange(b, device=xin.device) * gm).view(b, 1)
            src, dst = ei[:, 0] + offset, ei[:, 1] + offset
            edges = torch.stack([src[edge_mask], dst[edge_mask]])
            h = self.net.encoder(xin.reshape(b * gm, -1), edges).reshape(b, gm, -1)
        if not torch.is_grad_enabled():
            self._cached = (versions, xin[0].clone(), ei[0].clone(), edge_mask[0].clone(), h[0])
        return h

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        gm, dm, em = self.max_groups, self.max_devices, self.max_edges
        b = obs["node_mask"].shape[0]
        x = obs["node_features"].reshape(b, gm, self.node_dim).float()
        node_mask = obs["node_mask"].reshape(b, gm) > 0.5
        ei = obs["edge_index"].reshape(b, 2, em).round().long()
        ew = obs["edge_features"].reshape(b, em, -1)[..., 0].float()
        edge_mask = obs["edge_mask"].reshape(b, em) > 0.5
        dev = obs["device_features"].reshape(b, dm, -1).float()
        cur = current_index(obs["current_group"], gm)
        rows = torch.arange(b, device=x.device)

        present = dev[:, :, 0]
        xin = node_inputs(x[..., :NS], x[..., NS:NS + dm], present.unsqueeze(1))
        h = self._embed(xin, ei, edge_mask)
        nm = node_mask.to(h.dtype).unsqueeze(-1)
        pool = (h * nm).sum(1) / nm.sum(1).clamp_min(1.0)
        h_cur = h[rows, cur]

        # ---- pair features of the current group, from the observation (same columns as GNNPolicy tracks)
        placed = x[..., NS + dm:NS + 2 * dm]  # (B, Gm, Dm) one-hot of placed groups
        # neighbours of the current group that are placed already, on either end of an edge
        affinity = torch.zeros(b, dm, dtype=x.dtype, device=x.device)
        norm = torch.zeros(b, 1, dtype=x.dtype, device=x.device)
        for me, other in ((1, 0), (0, 1)):
            other_dev = placed.gather(1, ei[:, other].unsqueeze(-1).expand(-1, -1, dm))  # (B, Em, Dm)
            w = ew * (edge_mask & (ei[:, me] == cur.view(b, 1)))
            affinity = affinity + (w.unsqueeze(-1) * other_dev).sum(1)
            norm = norm + (w.unsqueeze(-1) * other_dev).sum((1, 2)).unsqueeze(1)
        affinity = affinity / norm.clamp_min(1e-8)
        shown = torch.full((b, dm, 1), float(self.net.finish_feature), dtype=x.dtype, device=x.device)
        dev = torch.cat([dev[..., :-1], dev[..., -1:] * shown], dim=-1)  # the last column is finish_estimate
        pair = torch.cat([x[rows, cur, NS:NS + dm].unsqueeze(-1), dev, shown, affinity.unsqueeze(-1)], dim=-1)
        logits = self.net.head(h_cur, pool, pair) / self.net.temperature
        logits = logits.masked_fill(present <= 0, -1e4)  # padding devices (the env masks them too)
        return torch.cat([h_cur, pool, logits], dim=1)
