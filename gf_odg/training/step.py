"""One training step as functions of its collaborators (docs/design.md sec. 3):

    collect:   prompts -> sampler (exploration, replay) -> trajectories -> reward score   -> StepBatch
    loss:      reference pass -> log R;  policy scoring -> log P_F;  log Z;  objective   -> Loss
    backward:  one pass, or micro-batches rescored with gradients (the same gradient)

Everything a step reads comes in through `StepParts` (policy, tokenizer, reward, task, objective,
log Z, prompt features, replay, processes) and the batch; the optimiser update, the counters and the
metrics stay with the caller (gf_odg/training/trainer.py wires them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from gf_odg.data.prompts import PromptBatch
from gf_odg.distributed import Dist
from gf_odg.exploration import behaviour as exploration
from gf_odg.exploration import local_search
from gf_odg.generation.sampling import Trajectories, decoder_and_head, pad_tokens, run_decoder, sample
from gf_odg.generation.scoring import score_completions
from gf_odg.log_reward import below_fluency_floor, log_reward_fn, target_log_reward, target_options
from gf_odg.model.loading import reference_mode
from gf_odg.objectives import Objective, ObjectiveBatch
from gf_odg.rewards.base import call_reward


@dataclass
class StepBatch:
    prompts: PromptBatch
    prompt_indices: list[int]  # task prompt index of each PromptBatch row
    traj: Trajectories
    score: torch.Tensor  # [N]
    from_replay: torch.Tensor  # [N] bool
    timings: dict = field(default_factory=dict)
    temperature_mean: float = 1.0  # the behaviour policy of the fresh samples
    epsilon: float = 0.0


@dataclass
class StepParts:
    """The collaborators of a step, wired once by the trainer."""
    policy: Any  # PeftModel: LoRA on, or adapters off under reference_mode
    tokenizer: Any
    reward: Any
    task: Any
    objective: Objective  # ObjectiveBatch -> (loss, diagnostics), with its declared needs
    log_z: Optional[torch.nn.Module]
    prompt_features: Callable[[list[int]], torch.Tensor]  # task prompt indices -> [P, H]
    replay: Optional[Any]
    dist: Dist
    device: torch.device


@dataclass
class Loss:
    """What the loss pass produced (the gradients are in the parameters' .grad when `finite`)."""
    loss: torch.Tensor
    log_pf: torch.Tensor  # [N]
    log_reward: torch.Tensor  # [N]
    log_z: Optional[torch.Tensor]  # [N]
    diagnostics: dict
    beta: float
    finite: bool  # on every process
    below_floor: Optional[torch.Tensor] = None  # [N] bool: under objective.fluency_floor (None: floor off)
    log_ref_token_mean: Optional[float] = None  # mean over the batch of log p_ref(y|x) / |y| (prior or floor on)


def prompt_batch(task, tokenizer, indices: list[int], device) -> PromptBatch:
    return PromptBatch.build([task.prompt_tokens[i] for i in indices], [task.prompts[i] for i in indices],
                             tokenizer.pad_token_id, device)


class PromptFeatures:
    """Frozen (adapters off) prompt representations for a conditioned log Z: the last prompt
    position's hidden state, [P, H], cached per prompt. (Mean pooling was measured to be nearly
    identical for two chat prompts, cosine 0.97, as the shared template dominates; the last position,
    which the policy itself conditions on, separates them: cosine 0.77.)"""

    def __init__(self, policy, tokenizer, task, device, dist: Optional[Dist] = None):
        self.policy, self.tokenizer, self.task, self.device, self.dist = policy, tokenizer, task, device, dist
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, indices: list[int]) -> torch.Tensor:
        missing = [i for i in indices if i not in self.cache]
        if self.dist is not None and self.dist.sharded and self.dist.any_true(bool(missing)):
            missing = list(indices)  # processes: FSDP's forward gathers every layer, so every process makes it
        if missing:
            prompts = prompt_batch(self.task, self.tokenizer, missing, self.device)
            decoder, _, _ = decoder_and_head(self.policy)
            with torch.no_grad(), reference_mode(self.policy):
                hidden, _ = run_decoder(decoder, input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                        position_ids=prompts.position_ids(), use_cache=False)
            for i, feature in zip(missing, hidden[:, -1].float()):
                self.cache[i] = feature
        return torch.stack([self.cache[i] for i in indices])


def choose_prompts(n: int, k: int, dist: Dist, generator: torch.Generator) -> list[int]:
    """`k` prompts for this process: its slice of one shared draw for all processes."""
    total, start = k * dist.world_size, k * dist.rank
    order = torch.randperm(n, generator=generator).tolist()
    chosen = [order[i % n] for i in range(total)]
    return chosen[start: start + k]


def collect(parts: StepParts, cfg, indices: list[int], step: int, behaviour_gen: torch.Generator,
            sample_gen: torch.Generator) -> StepBatch:
    """Sample K completions per prompt (some replayed), and score them with the reward."""
    tcfg, task = cfg.trainer, parts.task
    t0 = time.perf_counter()
    prompts = prompt_batch(task, parts.tokenizer, indices, parts.device)
    k = tcfg.samples_per_prompt
    n_replay = int(round(exploration.replay_fraction_at(cfg.exploration, step) * k))
    replayed = []  # (row, entry)
    t_rescore = 0.0
    if n_replay and parts.replay is not None:
        for row, i in enumerate(indices):
            # Always this prompt's entries, whatever the scope: a trajectory is trained under the prompt
            # it was scored with (a global pool shares memory and priorities, not (x, y, R) triples).
            key = task.prompts[i]
            n_rescore = int(round(cfg.exploration.replay.rescore * k))
            if parts.replay.priority == "ratio" and parts.replay.size(key) > 0 and n_rescore:
                t = time.perf_counter()
                rescore_replay(parts, tcfg, prompts, row, key, n_rescore)
                t_rescore += time.perf_counter() - t
            if parts.replay.size(key) > 0:
                replayed += [(row, e) for e in parts.replay.sample(key, n_replay, behaviour_gen,
                                                                    log_reward_fn(cfg.objective, step))]
    n_fresh = [k - sum(1 for r, _ in replayed if r == row) for row in range(len(indices))]
    group = torch.tensor([row for row, m in enumerate(n_fresh) for _ in range(m)], dtype=torch.long)
    temps = exploration.behaviour_temperatures(cfg.exploration, len(group), behaviour_gen)
    eps = exploration.epsilon_at(cfg.exploration, step)
    traj = sample(parts.policy, parts.tokenizer, prompts, group.to(parts.device), task.constraints,
                  temperature=temps.to(parts.device), epsilon=eps, generator=sample_gen,
                  share_prefill=tcfg.share_prompt_prefill)
    t1 = time.perf_counter()
    fresh_prompts = [task.prompts[indices[int(g)]] for g in group]
    score = call_reward(parts.reward, fresh_prompts, traj.texts, **task.reward_kwargs([indices[int(g)] for g in group]))
    t2 = time.perf_counter()
    searched = {}
    if cfg.exploration.local_search.enabled:  # refines fresh rows only, before the replayed ones join
        traj, score, searched = local_search.refine_batch(parts, cfg, prompts, indices, traj, score, step,
                                                          behaviour_gen, sample_gen)
    if replayed:
        traj = merge_replayed(traj, replayed, task.constraints.eos_id, parts.device)
        score = torch.cat([score, torch.tensor([float(e.score) for _, e in replayed])])
    from_replay = torch.zeros(len(traj), dtype=torch.bool)
    from_replay[len(group):] = True
    timings = {"time/sample": t1 - t0 - t_rescore, "time/reward": t2 - t1, **searched}
    if t_rescore:
        timings["time/replay_rescore"] = t_rescore
    return StepBatch(prompts, indices, traj, score, from_replay, timings,
                     temperature_mean=float(temps.mean()) if len(temps) else 1.0, epsilon=eps)


@torch.no_grad()
def rescore_replay(parts: StepParts, tcfg, prompts: PromptBatch, row: int, key: str, n: int) -> None:
    """log P_F under the current policy of the n entries of this prompt's pool recorded longest ago,
    recorded for `priority=ratio`: a completion the policy stopped sampling has no fresh score
    otherwise, and its stale one hides that it is starved (on `rng`, "100" kept a recorded log P_F of
    -4.95 while the policy's fell to -13). One no-grad pass over n rows (`exploration.replay.rescore` x K: at
    0.25 and K = 32 the 101 rng integers are all rescored every 13 steps, the popular ones more often
    as trained rows; K / 2 cost 0.25 s of a 1.5 s step on 2 CPU cores and trained no better, and the
    whole pool every step cost as much as the step's forward and backward, docs/results/first_run.md)."""
    entries = parts.replay.stalest(key, n)
    eos_id = parts.task.constraints.eos_id
    tokens, lengths = pad_tokens([e.tokens for e in entries], eos_id, parts.device)
    group = torch.full((len(entries),), row, dtype=torch.long, device=parts.device)
    lp = score_completions(parts.policy, prompts, group, tokens, lengths,
                           parts.task.constraints, eos_id, tcfg.share_prompt_prefill, tcfg.score_chunk_rows)
    parts.replay.record_log_pf([key] * len(entries), [e.tokens for e in entries], lp.total().double().cpu().tolist())


def merge_replayed(traj: Trajectories, replayed: list, eos_id: int, device) -> Trajectories:
    tokens = [list(e.tokens) for _, e in replayed]
    width = max(traj.tokens.shape[1], max(len(t) for t in tokens))
    out = torch.full((len(traj) + len(tokens), width), eos_id, dtype=torch.long, device=device)
    out[: len(traj), : traj.tokens.shape[1]] = traj.tokens
    for i, t in enumerate(tokens):
        out[len(traj) + i, : len(t)] = torch.tensor(t, device=device)
    lengths = torch.cat([traj.lengths, torch.tensor([len(t) for t in tokens], device=device)])
    group = torch.cat([traj.group.to(device), torch.tensor([row for row, _ in replayed], device=device)])
    return Trajectories(group=group, tokens=out, lengths=lengths, texts=traj.texts + [e.text for _, e in replayed])


def loss_and_backward(parts: StepParts, cfg, batch: StepBatch, step: int) -> Loss:
    """The objective's loss on `batch`, backpropagated into the LoRA and log Z gradients when it is
    finite on every process (the caller zeroes gradients before and steps the optimiser after)."""
    ocfg, tcfg, constraints = cfg.objective, cfg.trainer, parts.task.constraints
    traj, dev, policy = batch.traj, parts.device, parts.policy
    group = traj.group.to(dev)
    target = target_options(ocfg, step)
    beta = target.beta
    needs_ref = target.needs_reference or parts.objective.needs_reference
    want_eos = parts.objective.needs_prefix_scores  # log P_F(EOS | s_t) at every state, and prefix rewards
    log_ref = None
    ref_lp = None
    tokens, lengths = traj.tokens.to(dev), traj.lengths.to(dev)
    if needs_ref:
        ref_lp = reference_log_probs(policy, ocfg, tcfg, batch.prompts, group, tokens, lengths, constraints, want_eos)
        log_ref = ref_lp.total().float()
    score = batch.score.to(dev)
    log_r = target_log_reward(score, target, log_ref, lengths)
    below = below_fluency_floor(target, log_ref, lengths)

    def score_rows(rows):
        return score_completions(policy, batch.prompts, group[rows], tokens[rows], lengths[rows], constraints,
                                 constraints.eos_id, tcfg.share_prompt_prefill, tcfg.score_chunk_rows,
                                 want_eos=want_eos)

    micro = tcfg.micro_batch_size
    accumulate = 0 < micro < len(traj)
    if accumulate:
        # Micro-batching: log P_F of the whole batch without gradients first; the loss is then a
        # function of those numbers (leaves), and after its backward each micro-batch is rescored
        # with gradients and backpropagated with the leaves' gradients: the same gradient as one
        # pass over the batch, with the activations of only `micro_batch_size` samples held at once.
        with torch.no_grad():
            lp = score_rows(slice(None))
        lp.token = lp.token.float().requires_grad_()
        if want_eos:
            lp.eos = lp.eos.float().requires_grad_()
    else:
        lp = score_rows(slice(None))
    log_pf = lp.total().float()
    log_z = None
    if parts.log_z is not None:
        if ocfg.log_z_init is None and step == 0:
            # log Z from the first batch: with long completions log P_F is around -100 and a
            # log Z started at 0 would need a thousand steps at log_z_lr = 0.1 to get there.
            parts.log_z.initialise(parts.dist.mean(float((log_r - log_pf.detach()).mean())))
        log_z = parts.log_z(parts.prompt_features(batch.prompt_indices))[group]
    violated = ~torch.isfinite(score) if below is None else ~torch.isfinite(score) | below
    obj_batch = ObjectiveBatch(log_pf=log_pf, log_reward=log_r.detach(), score=score, group=group, log_z=log_z,
                               log_ref=log_ref, lengths=lengths, beta=beta, violated=violated)
    if want_eos:
        obj_batch.log_pf_tokens = lp.token.float()
        obj_batch.log_pf_stop = lp.eos.float()
        obj_batch.prefix_log_reward = _prefix_log_rewards(parts, target, batch, ref_lp)
    loss, diag = parts.objective(obj_batch)
    finite = parts.dist.all_true(bool(torch.isfinite(loss)))  # every process skips, or none does
    if finite:
        loss.backward()
        if accumulate:
            _backward_micro_batches(score_rows, lp, len(traj), micro)
    token_mean = float((log_ref / lengths).mean()) if target.needs_reference else None
    return Loss(loss, log_pf, log_r, log_z, diag, beta, finite, below, token_mean)


@torch.no_grad()
def reference_log_probs(policy, ocfg, tcfg, prompts, group, tokens, lengths, constraints, want_eos: bool):
    """log p_ref per completion token (and of EOS at each state, for SubTB's prefix rewards): the
    base model (adapters off) over its whole vocabulary, unmasked, the completion's EOS included, so
    that log p_ref(y|x) is the prior users mean, forced stops costing what the base model says.
    `objective.ref_masked=true` renormalises over the constraint mask instead (a different target)."""
    mask = constraints if ocfg.get("ref_masked", False) else None
    with reference_mode(policy):
        return score_completions(policy, prompts, group, tokens, lengths, mask, constraints.eos_id,
                                 tcfg.share_prompt_prefill, tcfg.score_chunk_rows, want_eos=want_eos)


def _backward_micro_batches(score_rows, leaves, n: int, micro: int) -> None:
    for start in range(0, n, micro):
        rows = slice(start, min(n, start + micro))
        part = score_rows(rows)
        if leaves.token.grad is None:  # the loss did not use log P_F (nothing to propagate)
            return
        surrogate = (part.token.float() * leaves.token.grad[rows]).sum()
        if leaves.eos is not None and leaves.eos.grad is not None:
            eos_grad = leaves.eos.grad[rows]
            terms = part.eos.float() * eos_grad
            surrogate = surrogate + torch.where(eos_grad != 0, terms, torch.zeros_like(terms)).sum()
        surrogate.backward()


def _prefix_log_rewards(parts: StepParts, target, batch: StepBatch, ref_lp) -> torch.Tensor:
    """log R(s_t ⊤) [N, T]: the completion y_<t EOS, scored and priced as a whole completion
    (target_log_reward with its t + 1 tokens)."""
    traj, dev = batch.traj, parts.device
    prefixes = [[parts.tokenizer.decode(tokens[:t], skip_special_tokens=True) for t in range(len(tokens))]
                for tokens in traj.token_lists()]
    prompts = [batch.prompts.texts[int(g)] for g in traj.group]
    kwargs = parts.task.reward_kwargs([batch.prompt_indices[int(g)] for g in traj.group])
    scores = torch.as_tensor(parts.reward.score_prefixes(prompts, prefixes, **kwargs), dtype=torch.float32).to(dev)
    width = traj.tokens.shape[1]
    if scores.shape[1] < width:
        pad = torch.full((scores.shape[0], width - scores.shape[1]), -math.inf, device=dev)
        scores = torch.cat([scores, pad], dim=1)
    log_ref = None
    if ref_lp is not None and target.needs_reference:
        before = torch.cumsum(ref_lp.token, 1) - ref_lp.token
        log_ref = (before + ref_lp.eos).float()  # log p_ref(y_<t, EOS)
    lengths = torch.arange(1, width + 1, device=dev).expand(scores.shape[0], width)  # y_<t and EOS
    # Floored like every log R: a prefix scoring -inf (a violation) is still a state that may
    # terminate wherever EOS is allowed, with a tiny reward, so SubTB pushes its EOS down as TB does.
    # (States whose EOS is masked are left out by the objective, from log P_F(EOS) = -inf.)
    return target_log_reward(scores[:, :width], target, log_ref, lengths)


def add_to_replay(replay, batch: StepBatch, ocfg, step: int, below_floor: Optional[torch.Tensor] = None,
                  log_pf: Optional[torch.Tensor] = None) -> None:
    """The batch's fresh samples into the replay buffer (replayed ones are there already), except
    those under the fluency floor (`below_floor`, as the loss found them): violations, like -inf scores.
    `log_pf` [N], the policy's log P_F of each row as the loss scored it, is recorded for every row
    in the buffer (what exploration.replay.priority=ratio reads)."""
    if replay is None:
        return
    floored = [False] * len(batch.traj) if below_floor is None else below_floor.tolist()
    fresh = [i for i in range(len(batch.traj)) if not batch.from_replay[i] and not floored[i]]
    tokens = batch.traj.token_lists()
    prompts = [batch.prompts.texts[int(g)] for g in batch.traj.group]
    replay.add_batch([prompts[i] for i in fresh], [tuple(tokens[i]) for i in fresh],
                     [batch.traj.texts[i] for i in fresh],
                     [float(batch.score[i]) for i in fresh], log_reward_fn=log_reward_fn(ocfg, step))
    if log_pf is not None:
        replay.record_log_pf(prompts, tokens, log_pf.detach().double().cpu().tolist())
