"""Training objectives: one signature, `objective(batch) -> (loss, diagnostics)`.

Notation (docs/design.md sec. 1): x a prompt, y = (y_1 .. y_T, EOS) a completion, log P_F(y|x) the sum
of masked token log-probabilities of the training policy at temperature 1, log R(x, y) the floored
log-reward. Every objective below except RLOO is satisfied exactly when P_F(y|x) ∝ R(x, y), and
all of them except RLOO are off-policy: `batch` may come from any behaviour policy.

Each objective is one class that declares what it needs; `OBJECTIVES` (name -> class) is the one list
of them, read by config validation, `build_log_z`, the training step and the error messages. Adding
an objective is one class here (decorated with `@register`) and one configs/objective/<name>.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from gf_odg.errors import ConfigError


@dataclass
class ObjectiveBatch:
    log_pf: torch.Tensor  # [N] log P_F(y|x), grad
    log_reward: torch.Tensor  # [N] log R(x, y), floored, no grad
    score: torch.Tensor  # [N] raw reward score (RLOO maximises it)
    group: torch.Tensor  # [N] prompt index; the samples of one prompt share it
    log_z: Optional[torch.Tensor] = None  # [N] log Z(x) of each sample's prompt (TB)
    log_ref: Optional[torch.Tensor] = None  # [N] log p_ref(y|x) (RLOO's KL)
    # Modified SubTB: per state s_t (t = 0..T-1, the prefix y_<t)
    log_pf_tokens: Optional[torch.Tensor] = None  # [N, T] log P_F(y_t | s_t), 0 past the end
    log_pf_stop: Optional[torch.Tensor] = None  # [N, T] log P_F(EOS | s_t), -inf where EOS is masked
    prefix_log_reward: Optional[torch.Tensor] = None  # [N, T] log R(s_t ⊤)
    lengths: Optional[torch.Tensor] = None  # [N] tokens incl. EOS
    beta: float = 1.0  # the reward temperature of log_reward: score = beta * log R where log R is not floored
    violated: Optional[torch.Tensor] = None  # [N] bool: a hard violation (-inf score, or under the fluency floor)


class Objective:
    """What every objective declares (the defaults: a loss on whole trajectories, off-policy)."""

    name: ClassVar[str]
    needs_log_z: ClassVar[bool] = False  # a learned log Z(x) (scalar or prompt-conditioned)
    needs_reference: bool = False  # log p_ref(y|x) from a reference pass (adapters off) even when ref_weight=0
    needs_prefix_scores: ClassVar[bool] = False  # a reward with `score_prefixes`, and log P_F(EOS | s_t)
    on_policy_only: ClassVar[bool] = False  # unbiased only for samples from P_F itself: no exploration, no replay
    min_samples_per_prompt: ClassVar[int] = 1  # K; >= 2 for objectives that compare a prompt's samples

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        return cls()

    def __call__(self, batch: "ObjectiveBatch"):
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    return cls


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name={name!r} is not one of {', '.join(OBJECTIVES)}; "
                          "pick one with objective=<name> (configs/objective/).")
    return OBJECTIVES[name]


def names_where(**needs) -> list[str]:
    """The registered objectives whose declarations match, e.g. names_where(needs_prefix_scores=False)."""
    return [name for name, cls in OBJECTIVES.items() if all(getattr(cls, k) == v for k, v in needs.items())]


def _group_mean(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over each sample's group, broadcast back: [N] -> [N]."""
    n_groups = int(group.max()) + 1
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(0, group, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(
        0, group, torch.ones_like(values))
    return (sums / counts)[group]


@register
class TrajectoryBalance(Objective):
    """TB (Malkin et al. 2022):  L = mean_i (log Z(x_i) + log P_F(y_i|x_i) - log R(x_i, y_i))^2."""

    name = "tb"
    needs_log_z = True

    def __call__(self, batch: ObjectiveBatch):
        residual = batch.log_z + batch.log_pf - batch.log_reward  # [N]
        return residual.pow(2).mean(), {"residual": residual.detach()}


@register
class VarGrad(Objective):
    """Log-partition variance (Richter et al. 2020; Zhang et al. 2023): for the K samples of a prompt,
        zeta = mean_k (log R_k - log P_F,k),   L = mean_k (log P_F,k + zeta - log R_k)^2,
    the variance of log P_F - log R within the prompt; needs no log Z and K >= 2."""

    name = "vargrad"
    min_samples_per_prompt = 2

    def __call__(self, batch: ObjectiveBatch):
        diff = batch.log_reward - batch.log_pf  # [N]
        zeta = _group_mean(diff, batch.group)
        residual = -diff + zeta
        return residual.pow(2).mean(), {"residual": residual.detach(), "log_z_estimate": zeta.detach()}


@register
class ModifiedSubTB(Objective):
    """Modified SubTB (Hu et al. 2024, eq. 5): every prefix s_t may terminate with reward R(s_t ⊤).
    With  delta_t = log R(s_t⊤) + log P_F(y_t|s_t) + log P_F(⊤|s_{t+1}) - log R(s_{t+1}⊤) - log P_F(⊤|s_t)
    the loss is  sum_{i<j} lambda^(j-i) (sum_{t=i}^{j-1} delta_t)^2 / sum_{i<j} lambda^(j-i).
    The inner sum telescopes to phi_i - phi_j with
        phi_t = log R(s_t⊤) - log P_F(⊤|s_t) - sum_{u<t} log P_F(y_u|s_u),
    so only states that may terminate enter a pair: every state where EOS is allowed, with its
    floored prefix reward (a violation is a terminal state with a tiny reward, not a missing one:
    leaving it out lets the learned log Z absorb invalid mass at zero loss). The prompt state
    s_0 usually cannot terminate (an empty completion is masked); its flow is then the learned
    log Z(x), phi_0 = log Z(x), which anchors the first token's distribution (without it the first
    step is never constrained: measured TV 0.24 to the target with a loss near 0)."""

    name = "subtb"
    needs_log_z = True
    needs_prefix_scores = True

    def __init__(self, subtb_lambda: float = 1.0):
        self.subtb_lambda = subtb_lambda

    @classmethod
    def from_config(cls, cfg) -> "ModifiedSubTB":
        return cls(cfg.subtb_lambda)

    def __call__(self, batch: ObjectiveBatch):
        n, width = batch.log_pf_tokens.shape
        before = torch.cumsum(batch.log_pf_tokens, dim=1) - batch.log_pf_tokens  # [N, T] sum_{u<t}
        phi = batch.prefix_log_reward - batch.log_pf_stop - before  # [N, T]
        t = torch.arange(width, device=phi.device)
        usable = (t.unsqueeze(0) < batch.lengths.unsqueeze(1)) & torch.isfinite(batch.log_pf_stop)  # EOS allowed
        if not bool(torch.isfinite(batch.prefix_log_reward[usable]).all()):
            raise ValueError("ModifiedSubTB: prefix_log_reward must be floored (finite) wherever EOS is allowed.")
        phi = torch.where(usable, phi, torch.zeros_like(phi))
        if batch.log_z is not None:  # s_0 cannot terminate: its flow is log Z(x)
            anchor = ~usable[:, 0]
            phi = torch.cat([torch.where(anchor, batch.log_z, phi[:, 0]).unsqueeze(1), phi[:, 1:]], dim=1)
            usable = torch.cat([(usable[:, 0] | anchor).unsqueeze(1), usable[:, 1:]], dim=1)
        diff = phi.unsqueeze(2) - phi.unsqueeze(1)  # [N, i, j]
        span = (t.unsqueeze(0) - t.unsqueeze(1)).to(phi.dtype)  # [i, j] = j - i
        pair = usable.unsqueeze(2) & usable.unsqueeze(1) & (span > 0).unsqueeze(0)
        weight = torch.where(pair, self.subtb_lambda ** span.clamp(min=0).unsqueeze(0), torch.zeros_like(diff))
        per_sample = (weight * diff.pow(2)).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp(min=1e-12)
        full = batch.log_pf - batch.log_reward  # the whole-trajectory log-ratio, for diagnostics
        return per_sample.mean(), {"residual": (full - _group_mean(full, batch.group)).detach()}


@register
class RLOO(Objective):
    """REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024), maximising
        r_k = score_k - kl_coef * (log P_F,k - log p_ref,k)
    with  A_k = r_k - mean_{j != k} r_j  over the K samples of a prompt,  L = -mean_k A_k log P_F,k.
    The reward-maximising baseline: its optimum concentrates on the best completions."""

    name = "rloo"
    on_policy_only = True
    min_samples_per_prompt = 2

    def __init__(self, kl_coef: float = 0.0):
        self.kl_coef = kl_coef
        self.needs_reference = bool(kl_coef)  # the KL term's log p_ref

    @classmethod
    def from_config(cls, cfg) -> "RLOO":
        return cls(cfg.kl_coef)

    def __call__(self, batch: ObjectiveBatch):
        reward = batch.score.clone()
        # a violation (a -inf score, or a completion under the fluency floor) scores the floor in score
        # units: beta * log R, where gf_odg.log_reward floored log R at log_reward_min
        violated = ~torch.isfinite(reward) if batch.violated is None else batch.violated
        reward = torch.where(violated, batch.beta * batch.log_reward, reward)
        if self.kl_coef and batch.log_ref is not None:
            reward = reward - self.kl_coef * (batch.log_pf.detach() - batch.log_ref)
        n_groups = int(batch.group.max()) + 1
        ones = torch.ones_like(reward)
        counts = torch.zeros(n_groups, device=reward.device).index_add(0, batch.group, ones)[batch.group]
        sums = torch.zeros(n_groups, device=reward.device).index_add(0, batch.group, reward)[batch.group]
        if bool((counts < 2).any()):
            raise ConfigError(f"objective={self.name} needs trainer.samples_per_prompt >= 2 "
                              "(a leave-one-out baseline).")
        advantage = reward - (sums - reward) / (counts - 1)
        loss = -(advantage.detach() * batch.log_pf).mean()
        return loss, {"residual": advantage.detach()}


class ScalarLogZ(nn.Module):
    """log Z as one learned scalar, shared by all prompts."""

    def __init__(self, init: float = 0.0):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init)))

    def forward(self, prompt_features: torch.Tensor) -> torch.Tensor:  # [P, H] -> [P]
        return self.value.expand(prompt_features.shape[0])

    @torch.no_grad()
    def initialise(self, value: float) -> None:
        self.value.fill_(value)


class ConditionedLogZ(nn.Module):
    """Prompt-conditioned log Z(x): a small MLP on the frozen (adapters off) representation of the
    prompt's last position, so one policy serves prompts whose partition functions differ."""

    def __init__(self, hidden_size: int, width: int = 64, init: float = 0.0):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(float(init)))
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.Tanh(),
                                 nn.Linear(width, 1, bias=False))
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, prompt_features: torch.Tensor) -> torch.Tensor:
        return self.offset + self.net(prompt_features.float()).squeeze(-1)

    @torch.no_grad()
    def initialise(self, value: float) -> None:
        self.offset.fill_(value)

    def param_groups(self, lr: float, head_lr: float) -> list[dict]:
        """The shared offset learns at log Z's rate; the MLP, whose steps move every prompt's log Z
        at once, at `head_lr` (at 0.1 it was measured to saturate and lose the prompt signal)."""
        return [{"params": [self.offset], "lr": lr, "weight_decay": 0.0},
                {"params": list(self.net.parameters()), "lr": head_lr, "weight_decay": 0.0}]


def build_objective(cfg) -> Objective:
    return objective_class(cfg.name).from_config(cfg)


def build_log_z(cfg, hidden_size: int) -> Optional[nn.Module]:
    if not objective_class(cfg.name).needs_log_z:
        return None
    init = 0.0 if cfg.log_z_init is None else cfg.log_z_init  # None: set from the first batch
    if cfg.log_z == "scalar":
        return ScalarLogZ(init)
    if cfg.log_z == "conditioned":
        return ConditionedLogZ(hidden_size, cfg.log_z_hidden, init)
    raise ConfigError(f"objective.log_z={cfg.log_z!r} is not one of scalar, conditioned.")
