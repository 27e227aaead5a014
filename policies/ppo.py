"""PPO for the placement environment: sb3-contrib's ``MaskablePPO`` (Schulman et al., "Proximal Policy
Optimization Algorithms", 2017; invalid-action masking as in Huang & Ontañón, 2020) over the GNN policy.

Nothing of PPO is re-implemented here. This module is the glue that makes ``MaskablePPO`` an algorithm of our
registry (:data:`policies.registry.ALGOS`, name ``ppo``), so ``placer train --policy gnn --algo ppo`` gets the same
run folder, TensorBoard tags, checkpoints, resume and ``placement.json`` as REINFORCE:

- the actor is :class:`policies.gnn.GNNPolicy` itself: :class:`GNNMaskablePolicy` uses the
  :class:`~policies.gnn.GNNExtractor` (sharing the trainer's GNN modules) and takes the extractor's last ``Dm``
  features — the shared device head's logits — as the action logits; the critic is a small MLP on the extractor's
  features. So the trainer's ``policy.state_dict()`` is the trained actor, and a PPO run's policy places unseen
  graphs (:mod:`placer.app.place`) exactly like a REINFORCE run's;
- one :meth:`MaskablePPOAlgo.update` is one PPO iteration: a rollout of ``samples_per_update`` complete
  episodes (``n_steps = samples_per_update x G``, so rollouts start and end at episode boundaries) and
  ``n_epochs`` of clipped updates; it returns the episodes' placements, rewards and step times in the same
  :class:`policies.reinforce.UpdateStats` as REINFORCE; the losses come from SB3's logger;
- ``gamma = 1`` by default: the reward is ColocRL's terminal ``-sqrt(t / t_ref)`` (or Placeto's incremental
  rewards that sum to it), and every decision of an episode shares it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from placer.core.result import StepResult
from policies.base import PlacementPolicy
from policies.registry import register_algo
from policies.gnn import GNNExtractor, GNNPolicy
from policies.reinforce import UpdateStats

if TYPE_CHECKING:
    from envs.placement_env import PlacementEnv

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PPOConfig:
    """MaskablePPO hyperparameters (names as in the PPO paper / SB3)."""

    samples_per_update: int = 16
    """Complete episodes (placements) per rollout."""
    n_envs: int = 8
    """Environments stepped together (SB3 ``DummyVecEnv`` of :meth:`PlacementEnv.replica`), so each policy
    forward pass decides for that many episodes at once; the largest divisor of ``samples_per_update`` up to
    this is used, and 1 with a reward backend that cannot be shared (an engine-backed one)."""
    lr: float = 1e-3
    """Adam learning rate."""
    n_epochs: int = 4
    """Passes over each rollout."""
    minibatches: int = 4
    """Minibatches per epoch at least (the batch size is ``n_steps / minibatches``, rounded down to a divisor)."""
    max_batch_steps: int = 1024
    """Largest minibatch in steps (the extractor embeds each distinct graph of a minibatch once, but its pair
    features and the critic still grow with the minibatch)."""
    gamma: float = 1.0
    """Discount (1: every decision shares the terminal reward)."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO's clipping epsilon."""
    entropy_coef: float = 0.01
    """Entropy bonus weight (SB3's ``ent_coef``; entropy per decision)."""
    vf_coef: float = 0.5
    """Value-loss weight."""
    max_grad_norm: float = 0.5
    """Gradient-norm clipping."""
    critic_hidden: int = 64
    """Width of the critic's hidden layer."""
    seed: int = 0
    """Seed of MaskablePPO (sampling, environment seeding)."""

    def __post_init__(self) -> None:
        if min(self.samples_per_update, self.n_envs, self.n_epochs, self.minibatches, self.max_batch_steps) < 1:
            raise ValueError("samples_per_update, n_envs, n_epochs, minibatches and max_batch_steps must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")


class _TakeLast(nn.Module):
    """The last ``n`` features: the GNN head's device logits."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, latent: Tensor) -> Tensor:
        return latent[..., -self.n:]


def _policy_class() -> type:
    from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy

    class GNNMaskablePolicy(MaskableMultiInputActorCriticPolicy):
        """``MaskableMultiInputActorCriticPolicy`` whose action logits are the GNN head's (module docstring)."""

        def _build(self, lr_schedule: Any) -> None:
            super()._build(lr_schedule)
            self.action_net = _TakeLast(int(self.action_space.n))
            # rebuild the optimizer: the Linear action net it was given is gone
            self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    return GNNMaskablePolicy


def _callback_class() -> type:
    from stable_baselines3.common.callbacks import BaseCallback

    class EpisodeCollector(BaseCallback):
        """Keeps the ``info`` of every finished episode; optionally checks each action against its mask."""

        def __init__(self, check_masks: bool = False) -> None:
            super().__init__()
            self.episodes: list[dict[str, Any]] = []
            self.check_masks = check_masks
            self.masked_picks = 0
            self.decisions = 0
            self.constrained = 0
            """Decisions where the mask ruled out at least one real device."""

        def _on_step(self) -> bool:
            if self.check_masks and self.locals.get("action_masks") is not None:
                masks = np.asarray(self.locals["action_masks"]).reshape(len(self.locals["actions"]), -1)
                acts = np.asarray(self.locals["actions"]).reshape(-1)
                self.masked_picks += int((~masks[np.arange(len(acts)), acts].astype(bool)).sum())
                self.decisions += len(acts)
                self.constrained += int((~masks.astype(bool)).any(axis=1).sum())
            for info, done in zip(self.locals["infos"], self.locals["dones"]):
                if done and "placement" in info:
                    self.episodes.append(info)
            return True

    return EpisodeCollector


class MaskablePPOAlgo:
    """``MaskablePPO`` behind the :class:`policies.base.Algorithm` interface (module docstring)."""

    name = "ppo"

    def __init__(self, policy: PlacementPolicy, env: "PlacementEnv", config: PPOConfig | None = None, *,
                 check_masks: bool = False) -> None:
        if not isinstance(policy, GNNPolicy):
            raise ValueError(f"--algo ppo trains the gnn policy (MaskablePPO needs per-step observations); got "
                             f"{type(policy).__name__}")
        from sb3_contrib import MaskablePPO
        from stable_baselines3.common.logger import Logger
        from stable_baselines3.common.vec_env import DummyVecEnv

        self.policy, self.env = policy, env
        self.config = cfg = config or PPOConfig()
        self.n_steps = cfg.samples_per_update * env.num_groups  # per rollout, all environments together
        n_envs = 1
        if env.backend.replicable:  # an engine-backed reward owns worker processes: one environment
            n_envs = max(k for k in range(1, min(cfg.n_envs, cfg.samples_per_update) + 1)
                         if cfg.samples_per_update % k == 0)
        batch = max(1, min(cfg.max_batch_steps, self.n_steps // cfg.minibatches))
        while self.n_steps % batch:  # a divisor, so SB3 never truncates a minibatch
            batch -= 1
        envs = [env] + [env.replica() for _ in range(n_envs - 1)]
        self.venv = DummyVecEnv([lambda e=e: e for e in envs])
        self.model = MaskablePPO(
            _policy_class(), self.venv, learning_rate=cfg.lr, n_steps=self.n_steps // n_envs, batch_size=batch,
            n_epochs=cfg.n_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
            ent_coef=cfg.entropy_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
            device="cpu", verbose=0,
            policy_kwargs=dict(features_extractor_class=GNNExtractor, features_extractor_kwargs=dict(network=policy),
                               net_arch=dict(pi=[], vf=[cfg.critic_hidden]), ortho_init=False,
                               share_features_extractor=True))
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self.collector = _callback_class()(check_masks=check_masks)
        self.updates = 0

    def update(self) -> UpdateStats:
        self.collector.episodes.clear()
        self.model.learn(total_timesteps=self.n_steps, reset_num_timesteps=False, callback=self.collector,
                         log_interval=None)
        episodes = list(self.collector.episodes)
        results: list[StepResult] = [e["result"] for e in episodes]
        logs = self.model.logger.name_to_value
        self.updates += 1
        return UpdateStats(
            update=self.updates, rewards=np.array([self.env.reward_of(r) for r in results], dtype=np.float64),
            step_times_s=np.array([e["step_time_s"] if e["ok"] else math.inf for e in episodes], dtype=np.float64),
            placements=np.stack([e["placement"] for e in episodes]) if episodes else np.zeros((0, self.env.num_groups),
                                                                                              dtype=np.int64),
            results=results, loss=float(logs.get("train/loss", math.nan)),
            entropy=-float(logs.get("train/entropy_loss", math.nan)), grad_norm=math.nan,
            baseline=float(np.mean(self.model.rollout_buffer.values)))

    @torch.no_grad()
    def greedy(self) -> np.ndarray:
        """The actor's most likely placement ``(G,)``."""
        from policies.base import PolicyInput

        self.policy.eval()
        return self.policy.sample(PolicyInput.from_problem(self.env.problem), 1, greedy=True).actions[0].numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"sb3_policy": self.model.policy.state_dict(), "optimizer": self.model.policy.optimizer.state_dict(),
                "num_timesteps": self.model.num_timesteps, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.policy.load_state_dict(state["sb3_policy"])
        self.model.policy.optimizer.load_state_dict(state["optimizer"])
        self.model.num_timesteps = int(state["num_timesteps"])
        self.updates = int(state["updates"])


@register_algo("ppo", PPOConfig)
def make_ppo(policy: PlacementPolicy, env: "PlacementEnv", config: PPOConfig) -> MaskablePPOAlgo:
    return MaskablePPOAlgo(policy, env, config)
