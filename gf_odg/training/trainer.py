"""The training loop (docs/design.md sec. 3), one phase a screen:

    prompts -> sampler (no grad, KV cache, constraint mask, exploration) -> trajectories      step.collect
    trajectories -> reward -> score -> log R  (beta, lambda * log p_ref, floor)               step.loss_and_backward
    trajectories -> policy scoring (grad, teacher forcing, same mask) -> log P_F
    log P_F, log R, log Z -> objective -> loss -> backward -> optimiser (LoRA group, log Z group)   optim
    -> metrics (W&B + metrics.jsonl) -> replay buffer -> checkpoint (every N steps, atomic)    metrics, state

`Trainer.step()` is the one way to advance training; `Trainer.train()` is the loop around it. Several
processes show up as the few lines marked `# processes:`; everything else reads as one process.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from gf_odg.data.tasks import build_reward, build_task
from gf_odg.distributed import Dist, merge_metrics
from gf_odg.errors import ConfigError, GFODGError
from gf_odg.evaluation.core import evaluate_policy
from gf_odg.exploration import behaviour as exploration
from gf_odg.exploration.seeding import seed_replay
from gf_odg.evaluation.report import save_evaluation
from gf_odg.io import checkpoints
from gf_odg.io.model_card import write_model_card
from gf_odg.io.tracking import Tracker
from gf_odg.log_reward import beta_at, log_reward_fn, target_options
from gf_odg.model.loading import load_policy, model_summary, resolve_device
from gf_odg.objectives import build_log_z, build_objective, names_where
from gf_odg.training import metrics as step_metrics
from gf_odg.training import optim, state
from gf_odg.training.optim import build_optimizer, lr_factor  # noqa: F401 - re-exported
from gf_odg.training.state import save_adapter, seed_everything  # noqa: F401 - re-exported
from gf_odg.training.step import (  # noqa: F401 - StepBatch, merge_replayed re-exported
    PromptFeatures, StepBatch, StepParts, add_to_replay, choose_prompts, collect, loss_and_backward,
    merge_replayed, prompt_batch)

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_name = cfg.run_name
        self.eval_rows: dict[str, list[dict]] = {}  # tag -> the evaluation's samples (train.py prints a few)
        self.dist = Dist()
        self.device = resolve_device(cfg.trainer.device)
        if self.dist.enabled and self.device.type == self.dist.device.type:  # processes: one GPU each
            self.device = self.dist.device  # (QLoRA: the whole model on it)
        self.stop_requested = False
        self.progress = state.Progress()
        self.nonfinite_in_row = 0
        self.resume_from = self._find_resume()
        self._check_outputs()

    # the run's counters (saved in checkpoints)
    global_step = property(lambda self: self.progress.step, lambda self, v: setattr(self.progress, "step", v))
    nonfinite_total = property(lambda self: self.progress.nonfinite_total)
    found = property(lambda self: self.progress.found)

    # ----------------------------------------------------------------- setup
    def _find_resume(self) -> Optional[Path]:
        if not self.cfg.resume:
            return None
        found = checkpoints.find_resume(self.cfg.resume, Path(self.cfg.paths.checkpoints), self.run_name)
        if found is None:
            log.info("resume=auto: no complete checkpoint of run %r yet; starting fresh", self.run_name)
        return found

    def _check_outputs(self) -> None:
        adapter_dir = Path(self.cfg.paths.adapted_models) / self.run_name
        if adapter_dir.exists() and self.resume_from is None:
            raise ConfigError(
                f"run_name={self.run_name!r}: an adapter already exists at {adapter_dir}; it will not be "
                "overwritten. Choose another run_name, or resume=auto to continue that run."
            )
        for key in ("checkpoints", "adapted_models"):
            folder = Path(self.cfg.paths[key])
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write-test-{os.getpid()}-{id(self)}"
                probe.write_text("ok")
                probe.unlink()
            except OSError as err:
                raise ConfigError(f"paths.{key}={str(folder)!r} cannot be written ({err.strerror}); "
                                  "point it at a writable folder.") from None

    def setup(self) -> None:
        cfg = self.cfg
        replay_cfg = cfg.exploration.replay
        if self.dist.fsdp and replay_cfg.enabled and replay_cfg.priority == "ratio":
            # its rescoring pass runs on a process only when that process's pool is not empty: under
            # FSDP every forward is a collective, and the counts would fall out of step
            raise ConfigError("exploration.replay.priority=ratio is not supported under FSDP; launch with "
                              "configs/accelerate/ddp.yaml or pick priority=softmax.")
        if self.dist.fsdp and cfg.exploration.local_search.enabled:
            # its proposals are sampled only for the rows a process refines: the same collective problem
            raise ConfigError("exploration.local_search.enabled=true is not supported under FSDP; launch with "
                              "configs/accelerate/ddp.yaml or turn local search off.")
        if cfg.trainer.threads > 0:
            torch.set_num_threads(cfg.trainer.threads)
        self._deterministic_before = state.deterministic_kernels(cfg.trainer.deterministic, self.device)
        seed_everything(cfg.seed)
        if not self.dist.is_main:  # processes: rank 0 first, it converts or downloads the base model once
            self.dist.barrier()
        self.reward, self.model, self.tokenizer, self.base_path, self.task = build_policy_and_task(cfg, self.device)
        if self.dist.is_main:
            self.dist.barrier()
        self.objective = build_objective(cfg.objective)
        if self.objective.needs_prefix_scores and not hasattr(self.reward, "score_prefixes"):
            raise ConfigError(
                f"objective={self.objective.name} needs a reward that scores every prefix (a `score_prefixes` "
                f"method); task.reward {type(self.reward).__name__} has none. Use objective="
                f"{' or '.join(names_where(needs_prefix_scores=False, on_policy_only=False))}.")
        message = exploration.epsilon_warning(cfg.exploration, self.task.constraints, len(self.tokenizer))
        if message and self.dist.is_main:
            log.warning(message)
        hidden = self.model.get_base_model().config.hidden_size
        self.log_z = build_log_z(cfg.objective, hidden)
        if self.log_z is not None:
            self.log_z.to(self.device)
        self.dist.broadcast_trainable(self.model, self.log_z)  # processes: all start from rank 0's LoRA and log Z
        self.dist.shard(self.model, cfg.model)  # processes: FSDP shards decoder layers (before the optimizer)
        self._prompt_features = PromptFeatures(self.model, self.tokenizer, self.task, self.device, self.dist)
        self.optimizer = build_optimizer(cfg.trainer.optimizer, optim.param_groups(self.model, self.log_z, cfg.trainer),
                                         self.device)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.trainer)
        self.generators = state.Generators.seeded(cfg.seed, self.dist.rank, self.device)
        self.replay = build_replay(cfg.exploration.replay)
        if self.resume_from is not None:
            self.progress = state.restore(self.checkpointed, self.resume_from, self.device)
        elif self.replay is not None:
            seed_replay(self.replay, self.task, self.tokenizer, cfg.objective, cfg.exploration.replay.seed,
                        cfg.task.evaluation.exact_limit, self.model)
        self.tracker = Tracker(cfg.logger, self.run_dir, self.run_name, OmegaConf.to_container(cfg, resolve=True),
                               resume_id=self.progress.wandb_id, enabled=self.dist.is_main)
        self.progress.wandb_id = self.tracker.run_id
        self.tracker.summary({**model_summary(self.model), "world_size": self.dist.world_size})

    @property
    def parts(self) -> StepParts:
        """What a step works with (read from the trainer's attributes at each call)."""
        return StepParts(self.model, self.tokenizer, self.reward, self.task, self.objective, self.log_z,
                         self._prompt_features, self.replay, self.dist, self.device)

    @property
    def checkpointed(self) -> state.Checkpointed:
        return state.Checkpointed(self.model, self.log_z, self.optimizer, self.scheduler, self.replay,
                                  self.generators, self.dist, self.base_path, self.run_name)

    # ----------------------------------------------------------------- one step
    def step(self) -> dict:
        """Advance training by one step: collect a batch, update the parameters, count the step.
        The one way to advance training (benchmarks and tests use it too); the batch stays in
        `self.last_batch`."""
        t0 = time.perf_counter()
        batch = self.collect()
        metrics = self.train_step(batch)
        self.global_step += 1
        self.last_batch = batch
        metrics["time/step"] = time.perf_counter() - t0
        return metrics

    def collect(self):
        """Sample K completions per prompt (some replayed), and score them with the reward."""
        indices = choose_prompts(len(self.task.records), self.cfg.trainer.prompts_per_step, self.dist,
                                 self.generators.prompt)
        return collect(self.parts, self.cfg, indices, self.global_step, self.generators.behaviour,
                       self.generators.sample)

    def train_step(self, batch) -> dict:
        """Loss, backward, optimiser step on `batch`, and the step's metrics (the step is not counted)."""
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        result = loss_and_backward(self.parts, self.cfg, batch, self.global_step)
        norms = {optim.LORA: float("nan")}
        if result.finite:
            norms = optim.apply_update(self.optimizer, self.scheduler, self.dist, self.cfg.trainer.grad_clip)
        self._count_nonfinite(all(math.isfinite(n) for n in norms.values()))
        t1 = time.perf_counter()
        self.found.update(step_metrics.new_valid_texts(batch, self.dist))
        metrics = step_metrics.step_metrics(
            batch, result, norms, lr=self.scheduler.get_last_lr()[0],
            max_new_tokens=self.task.constraints.max_new_tokens, distinct_valid=len(self.found),
            nonfinite_total=self.nonfinite_total, reward=self.reward, replay=self.replay,
            log_reward_fn=log_reward_fn(self.cfg.objective, self.global_step))
        metrics.update(batch.timings)
        metrics["time/score_backward"] = t1 - t0  # reference pass, scoring, backward, optimiser
        add_to_replay(self.replay, batch, self.cfg.objective, self.global_step, result.below_floor,
                      result.log_pf)
        return metrics

    def _count_nonfinite(self, finite: bool) -> None:
        if finite:
            self.nonfinite_in_row = 0
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.progress.nonfinite_total += 1
        if self.nonfinite_in_row >= self.cfg.trainer.max_nonfinite_steps:
            raise GFODGError(
                f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (step {self.global_step}); "
                "stopping. The last good checkpoint is intact. Lower trainer.lr, raise "
                "objective.log_reward_min, or check the reward.")

    def save_checkpoint(self) -> Optional[Path]:
        return state.save(self.checkpointed, self.progress, Path(self.cfg.paths.checkpoints) / self.run_name,
                          OmegaConf.to_yaml(self.cfg, resolve=True), self.cfg.trainer.keep_checkpoints)

    # ----------------------------------------------------------------- the run
    def evaluate(self, tag: str) -> Optional[dict]:
        """Rank 0 evaluates (the parameters are the same everywhere); the others wait for it."""
        with self.dist.full_params(self.model):  # FSDP: every layer whole while rank 0 samples alone
            if not self.dist.is_main:
                self.dist.barrier()
                return None
            result = self._evaluate(tag)
            self.dist.barrier()
        return result

    def _evaluate(self, tag: str) -> dict:
        """Against the target the run trains toward: the reward at the final beta (before and after alike)."""
        ecfg, ocfg = self.cfg.task.evaluation, self.cfg.objective
        beta = beta_at(ocfg, self.cfg.trainer.max_steps)
        evaluation = evaluate_policy(self.model, self.tokenizer, self.task, ecfg.n_samples, ecfg.batch_size,
                                     beta=beta, seed=self.cfg.seed + 1000,
                                     share_prefill=self.cfg.trainer.share_prompt_prefill, exact=ecfg.exact,
                                     exact_limit=ecfg.exact_limit, target=target_options(ocfg, beta=beta))
        result, rows = evaluation.result, evaluation.rows
        save_evaluation(self.run_dir, tag, result, rows, self.task, exact=evaluation.exact, beta=beta,
                        plots=ecfg.plots)
        self.eval_rows[tag] = rows
        self.tracker.log({f"eval_{tag}/{k}": v for k, v in result.items() if isinstance(v, (int, float))},
                         step=self.global_step)
        self.tracker.log_samples(rows[:64], step=self.global_step, key=f"eval_{tag}/samples")
        return result

    def train(self) -> dict:
        cfg = self.cfg
        before = None
        if cfg.task.evaluation.before_training and self.global_step == 0:
            before = self.evaluate("before")
        show = cfg.trainer.progress and self.dist.is_main
        with handle_signals(self), make_progress(show, cfg.trainer.max_steps, self.global_step) as progress:
            while self.global_step < cfg.trainer.max_steps and not self.stop_requested:
                metrics = self.step()
                if self.dist.enabled:  # processes: one line of metrics, and all stop at the same step
                    metrics = {**merge_metrics(self.dist.gather(metrics)), "world_size": self.dist.world_size}
                    self.stop_requested = self.dist.any_true(self.stop_requested)
                self.tracker.log(metrics, step=self.global_step)
                if cfg.trainer.sample_table_every and self.global_step % cfg.trainer.sample_table_every == 0:
                    rows = step_metrics.sample_rows(self.last_batch, self.global_step)
                    rows = [row for part in self.dist.gather(rows) for row in part]  # processes: all samples
                    self.tracker.log_samples(rows, step=self.global_step)
                if cfg.trainer.checkpoint_every and self.global_step % cfg.trainer.checkpoint_every == 0:
                    self.save_checkpoint()
                progress.update(1)
                progress.set_postfix(step_metrics.progress_postfix(metrics))
        if not (cfg.trainer.checkpoint_every and self.global_step % cfg.trainer.checkpoint_every == 0):
            self.save_checkpoint()  # (a checkpoint of this step was just written otherwise)
        if self.stop_requested:
            log.warning("stopped by a signal at step %d; checkpoint saved. Continue with resume=auto run_name=%s",
                        self.global_step, self.run_name)
            return {"interrupted": True, "step": self.global_step}
        adapter_dir = Path(cfg.paths.adapted_models) / self.run_name
        adapter_state = self.dist.full_trainable_state(self.model)  # processes: FSDP gathers the LoRA whole
        if self.dist.is_main:
            save_adapter(self.model, adapter_dir, adapter_state)
        self.dist.barrier()
        after = self.evaluate("after")
        summary = {"before": before, "after": after, "steps": self.global_step, "adapter": str(adapter_dir),
                   "rows": self.eval_rows}
        if not self.dist.is_main:
            return summary
        self.tracker.summary({f"eval_after/{k}": v for k, v in after.items() if isinstance(v, (int, float))})
        write_model_card(adapter_dir, cfg, before, after, steps=self.global_step,
                         base_model=cfg.model.name_or_path if cfg.model.source == "hub" else self.base_path)
        return summary

    def close(self, exit_code: int = 0) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.finish(exit_code)
        if getattr(self, "_deterministic_before", None) is not None:  # process-wide: as it was before setup
            enabled, warn_only = self._deterministic_before
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        self.dist.close()


def build_policy_and_task(cfg, device: torch.device):
    """(reward, policy with fresh LoRA, tokenizer, base model path, task), bound together: what a
    training run and the benchmarks' baselines start from."""
    reward = build_reward(cfg.task.reward)  # before the model: a bad _target_ fails fast
    model, tokenizer, base_path = load_policy(cfg.model, cfg.paths, device)
    task = build_task(cfg.task, tokenizer, cfg.model.chat_template, cfg.paths.root, reward=reward)
    if hasattr(reward, "bind"):  # rewards that score with the policy's base model (adapters off)
        reward.bind(model, tokenizer)
    return reward, model, tokenizer, base_path, task


def build_replay(cfg):
    if not cfg.enabled:
        return None
    from gf_odg.exploration.replay import ReplayBuffer

    embed_fn = None
    if cfg.dedup == "embedding":
        from gf_odg.rewards.embedding import embed

        embed_fn = embed
    return ReplayBuffer.from_config(cfg, embed_fn)


class handle_signals:
    """SIGTERM/SIGINT ask the loop to stop after the current step (which then checkpoints)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous = {}

    def _handler(self, signum, frame):
        if self.trainer.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("signal %d: finishing this step, then checkpointing", signum)
        self.trainer.stop_requested = True

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def make_progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
