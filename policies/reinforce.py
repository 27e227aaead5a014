"""REINFORCE as ColocRL trained its placer (Mirhoseini et al., ICML 2017, section 3.3; Williams, 1992).

Each update samples ``samples_per_update`` complete placements from the policy, scores each with the environment
(``env.evaluate``: the same reward an episode placing it would earn in total, cached by placement), and takes one
Adam step on

    loss = -mean_i[(R_i - b) * log p(a_i)] - entropy_coef * mean_i[H_i / G]

where ``H_i / G`` is the mean entropy per decision and ``b`` the baseline:

- ``"ema"`` (default): an exponential moving average of the batch-mean reward, ``b <- decay b + (1 - decay)
  mean(R)`` after each update, with ``decay = 0.9`` as in the hierarchical planner's open-source code; it starts at
  ``baseline_init`` when given (``-1.0`` is the reference placement's reward, an honest warm start) and otherwise
  at the first batch's mean;
- ``"batch"``: the batch's own mean reward (advantages sum to zero within an update);
- ``"quantile"``: risk-seeking policy gradient (Petersen et al., "Deep Symbolic Regression", ICLR 2021): the
  baseline is the batch's ``1 - top_fraction`` reward quantile and only the samples above it get a (positive)
  advantage, so the policy is pushed toward its best placements rather than its average one. We want the best
  placement found, not a good average, and on deceptive problems (a safe local optimum that most samples reach)
  the mean baseline converges to the safe optimum even after sampling the better one.

With ``self_imitation_coef > 0``, self-imitation learning (Oh et al., "Self-Imitation Learning", ICML 2018) adds
``-coef * mean_j[(R_j - b)_+ * log p(a_j)]`` over the ``self_imitation_size`` best placements seen so far: the
policy keeps being pulled toward its best finds, so its samples become variations of them (a learned,
stochastic local search), which helps when single-group changes are worth only a fraction of a percent.

A policy that samples in several *views* at once (:attr:`policies.base.PolicySample.view`: the GNN with
``finish_dropout`` draws some samples with its finish estimate hidden) is trained as one policy per view with
shared weights: the batch and quantile baselines, the normalisation and the self-imitation buffer (the
``self_imitation_size`` best placements of each view, replayed in that view) are per view. With one baseline for
all, the samples of the view that is worse on a graph were rarely above it and that view learnt nothing there; a
zero-shot GNN trained so placed NMT 29% behind one trained on it, in its hidden view, against 4-10% with a
per-view baseline (``benchmarks/bench_rl_part2.py``'s zero-shot step).

With ``normalize_advantage`` (default) the advantages are divided by the batch's reward standard deviation:
step times of good placements differ by a few percent, so raw advantages of ~0.01 would leave the entropy bonus
in charge; normalising makes the learning rate independent of the reward scale. Gradients are clipped to
``max_grad_norm``. Sampling draws from a ``torch.Generator`` seeded with ``seed`` and the
environment is deterministic, so the same seed gives the same rewards, update after update.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from placer.core.result import StepResult
from policies.base import PlacementPolicy, PolicyInput
from policies.registry import register_algo

if TYPE_CHECKING:
    from envs.placement_env import PlacementEnv

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ReinforceConfig:
    """REINFORCE hyperparameters (defaults suit ~10-100 groups on a few devices)."""

    samples_per_update: int = 16
    """Placements sampled per update (ColocRL's ``K``)."""
    lr: float = 3e-3
    """Adam learning rate."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus (mean entropy per decision, in nats)."""
    baseline: Literal["ema", "batch", "quantile"] = "ema"
    """``ema``: moving average of rewards; ``batch``: the update's own mean; ``quantile``: risk-seeking."""
    top_fraction: float = 0.25
    """``quantile`` baseline: the fraction of each batch that is trained on (Petersen et al.'s epsilon)."""
    baseline_decay: float = 0.9
    """EMA decay of the ``ema`` baseline."""
    baseline_init: float | None = None
    """Starting value of the ``ema`` baseline (``None``: the first batch's mean)."""
    normalize_advantage: bool = True
    """Divide advantages by the batch's reward standard deviation (see the module docstring)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    self_imitation_coef: float = 0.0
    """Weight of the self-imitation term (0: off)."""
    self_imitation_size: int = 4
    """How many of the best placements seen so far are replayed by self-imitation."""
    seed: int = 0
    """Seed of the sampling generator."""

    def __post_init__(self) -> None:
        if self.samples_per_update < 1:
            raise ValueError(f"samples_per_update must be >= 1, got {self.samples_per_update}")
        if self.baseline not in ("ema", "batch", "quantile"):
            raise ValueError(f"baseline must be 'ema', 'batch' or 'quantile', got {self.baseline!r}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass(kw_only=True)
class UpdateStats:
    """What one update did."""

    update: int
    """1-based update counter after this update."""
    rewards: np.ndarray
    """``(S,)`` reward of each sampled placement."""
    step_times_s: np.ndarray
    """``(S,)`` step time of each (``inf`` when failed)."""
    placements: np.ndarray
    """``(S, G)`` device per group."""
    results: list[StepResult] = field(repr=False)
    loss: float
    entropy: float
    """Mean entropy per decision (nats)."""
    grad_norm: float
    baseline: float
    """Baseline used for this update's advantages (the mean of the views' baselines when there are several)."""


class Reinforce:
    """REINFORCE with a moving-average baseline and an entropy bonus (module docstring)."""

    name = "reinforce"

    def __init__(self, policy: PlacementPolicy, env: "PlacementEnv", config: ReinforceConfig | None = None) -> None:
        self.policy, self.env = policy, env
        self.config = config or ReinforceConfig()
        self.input = PolicyInput.from_problem(env.problem)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=self.config.lr)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.baseline: float | None = self.config.baseline_init
        self.updates = 0
        self.elite: list[tuple[float, bytes, int]] = []  # self-imitation: (reward, int16 placement, view), best first

    def update(self) -> UpdateStats:
        cfg = self.config
        self.policy.train()
        # ---- sample and score
        sample = self.policy.sample(self.input, cfg.samples_per_update, generator=self.generator)
        placements = sample.actions.detach().cpu().numpy()
        scored = [self.env.evaluate(p) for p in placements]
        rewards = np.array([r for r, _ in scored], dtype=np.float64)
        results = [res for _, res in scored]
        views = (sample.view.cpu().numpy() if sample.view is not None
                 else np.zeros(len(rewards), dtype=np.int64))
        # ---- advantages, per view: a view that is worse on this graph still learns its own best
        adv_np = np.zeros_like(rewards)
        b_view, scale = {}, {}
        for v in np.unique(views).tolist():
            here = views == v
            adv_np[here], b_view[v] = self._advantages(rewards[here])
            scale[v] = 1.0 / (rewards[here].std() + 1e-8) if cfg.normalize_advantage else 1.0
            adv_np[here] *= scale[v]
        b = float(np.mean(list(b_view.values())))
        adv = torch.as_tensor(adv_np, dtype=torch.float32)
        entropy = sample.entropy / max(1, self.input.num_groups)
        loss = -(adv * sample.log_prob).mean() - cfg.entropy_coef * entropy.mean()
        replay = [e for e in self.elite if e[2] in b_view]
        if cfg.self_imitation_coef > 0 and replay:
            elite_adv = np.array([max(r - b_view[v], 0.0) * scale[v] for r, _, v in replay])
            if elite_adv.any():
                acts = torch.as_tensor(np.stack([np.frombuffer(a, dtype=np.int16) for _, a, _ in replay]),
                                       dtype=torch.int64)
                view = torch.tensor([v for _, _, v in replay]) if sample.view is not None else None
                lp = self.policy.log_prob(self.input, acts, view=view).log_prob
                loss = loss - cfg.self_imitation_coef * (torch.as_tensor(elite_adv, dtype=torch.float32) * lp).mean()
        self._remember(rewards, placements, views)
        # ---- step
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm))
        self.optimizer.step()
        if cfg.baseline == "ema":
            prev = float(rewards.mean()) if self.baseline is None else self.baseline
            self.baseline = cfg.baseline_decay * prev + (1 - cfg.baseline_decay) * float(rewards.mean())
        self.updates += 1
        return UpdateStats(update=self.updates, rewards=rewards,
                           step_times_s=np.array([r.step_time_s for r in results], dtype=np.float64),
                           placements=placements, results=results, loss=float(loss.detach()),
                           entropy=float(entropy.mean().detach()),
                           grad_norm=grad_norm if math.isfinite(grad_norm) else float("nan"), baseline=b)

    def _advantages(self, rewards: np.ndarray) -> tuple[np.ndarray, float]:
        """``(advantage per reward, baseline)`` of one view's rewards (before normalising)."""
        cfg = self.config
        if cfg.baseline == "quantile":
            b = float(np.quantile(rewards, 1.0 - cfg.top_fraction))
            return np.where(rewards >= b, rewards - b, 0.0), b
        b = float(rewards.mean()) if cfg.baseline == "batch" or self.baseline is None else self.baseline
        return rewards - b, b

    def seed_elite(self, rewards: np.ndarray, placements: np.ndarray) -> None:
        """Put known placements (e.g. a baseline's, with their rewards) into the self-imitation buffer (view 0)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        self._remember(rewards, np.asarray(placements).reshape(len(rewards), -1), np.zeros(len(rewards), dtype=int))

    def _remember(self, rewards: np.ndarray, placements: np.ndarray, views: np.ndarray) -> None:
        """Keep the ``self_imitation_size`` best distinct placements of each view."""
        if self.config.self_imitation_coef <= 0:
            return
        seen = {(a, v) for _, a, v in self.elite}
        for r, p, v in zip(rewards.tolist(), placements, views.tolist()):
            key = p.astype(np.int16).tobytes()
            if (key, v) not in seen:
                seen.add((key, v))
                self.elite.append((r, key, v))
        self.elite.sort(key=lambda e: -e[0])
        count: dict[int, int] = {}
        kept = []
        for e in self.elite:
            count[e[2]] = count.get(e[2], 0) + 1
            if count[e[2]] <= self.config.self_imitation_size:
                kept.append(e)
        self.elite = kept

    @torch.no_grad()
    def greedy(self) -> np.ndarray:
        """The policy's most likely placement ``(G,)``."""
        self.policy.eval()
        return self.policy.sample(self.input, 1, greedy=True).actions[0].cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "baseline": self.baseline, "updates": self.updates, "elite": list(self.elite)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline = state["baseline"]
        self.updates = int(state["updates"])
        self.elite = [(e[0], e[1], e[2] if len(e) > 2 else 0) for e in state.get("elite", [])]  # 2-tuples: view 0


@register_algo("reinforce", ReinforceConfig)
def make_reinforce(policy: PlacementPolicy, env: "PlacementEnv", config: ReinforceConfig) -> Reinforce:
    return Reinforce(policy, env, config)
