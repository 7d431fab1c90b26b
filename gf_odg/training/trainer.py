"""The training loop (docs/design.md sec. 3), one phase a screen:

    prompts -> sampler (no grad, KV cache, constraint mask, exploration) -> trajectories
    trajectories -> reward -> score -> log R  (beta, lambda * log p_ref, floor)
    trajectories -> policy scoring (grad, teacher forcing, same mask) -> log P_F
    log P_F, log R, log Z -> objective -> loss -> backward -> optimiser (LoRA group, log Z group)
    -> metrics (W&B + metrics.jsonl) -> replay buffer -> checkpoint (every N steps, atomic)
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from gf_odg.io import checkpoints
from gf_odg.exploration import behaviour as exploration
from gf_odg.distributed import Dist, merge_metrics
from gf_odg.errors import CheckpointError, ConfigError, GFODGError
from gf_odg.evaluation.core import evaluate
from gf_odg.log_reward import beta_at, log_reward
from gf_odg.model.loading import load_policy, model_summary, reference_mode, resolve_device
from gf_odg.objectives import ObjectiveBatch, build_log_z, build_objective
from gf_odg.data.prompts import PromptBatch
from gf_odg.rewards.base import call_reward
from gf_odg.generation.sampling import Trajectories, decoder_and_head, run_decoder, sample
from gf_odg.generation.scoring import score_completions
from gf_odg.data.tasks import build_reward, build_task
from gf_odg.io.tracking import Tracker

log = logging.getLogger(__name__)


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


class Trainer:
    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_name = cfg.run_name
        self.dist = Dist()
        self.device = resolve_device(cfg.trainer.device)
        if self.dist.enabled and self.device.type == self.dist.device.type:
            self.device = self.dist.device  # each process its own GPU (QLoRA: the whole model on it)
        self.stop_requested = False
        self.global_step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.found: set[str] = set()  # distinct valid completions (finite score) sampled so far, stripped
        self.resume_from = self._find_resume()
        self._check_outputs()

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
        if cfg.trainer.threads > 0:
            torch.set_num_threads(cfg.trainer.threads)
        seed_everything(cfg.seed)
        if not self.dist.is_main:
            self.dist.barrier()  # rank 0 first: it converts or downloads the base model once
        self.reward, self.model, self.tokenizer, self.base_path, self.task = build_policy_and_task(cfg, self.device)
        if self.dist.is_main:
            self.dist.barrier()
        if cfg.objective.name == "subtb" and not hasattr(self.reward, "score_prefixes"):
            raise ConfigError(
                f"objective=subtb needs a reward that scores every prefix (a `score_prefixes` method); "
                f"task.reward {type(self.reward).__name__} has none. Use objective=tb or vargrad.")
        self.objective = build_objective(cfg.objective)
        if cfg.exploration.epsilon > 0 and self.task.constraints.allowed is None and self.dist.is_main:
            log.warning(
                "exploration.epsilon=%s with no allowed-token set: epsilon-uniform mixes over all %d tokens, which "
                "mostly draws junk (measured on experiment=sparse_rng: it did not help). Consider "
                "exploration.epsilon=0, or a task.constraints.allowed set.",
                cfg.exploration.epsilon, len(self.tokenizer))
        hidden = self.model.get_base_model().config.hidden_size
        self.dist.shard(self.model, cfg.model)  # FSDP launch: decoder layers sharded (before the optimizer)
        self.log_z = build_log_z(cfg.objective, hidden)
        if self.log_z is not None:
            self.log_z.to(self.device)
        self.prompt_features: dict[int, torch.Tensor] = {}
        lora_params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": lora_params, "lr": cfg.trainer.lr, "weight_decay": cfg.trainer.weight_decay}]
        if hasattr(self.log_z, "param_groups"):
            groups += self.log_z.param_groups(cfg.trainer.log_z_lr, cfg.trainer.log_z_head_lr)
        elif self.log_z is not None:
            groups.append({"params": list(self.log_z.parameters()), "lr": cfg.trainer.log_z_lr, "weight_decay": 0.0})
        self.optimizer = build_optimizer(cfg.trainer.optimizer, groups, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg.trainer))
        # The same seed everywhere gives every process the same LoRA initialisation and prompt order;
        # the samples and the behaviour policy's draws differ per process.
        offset = 1009 * self.dist.rank
        self.behaviour_gen = torch.Generator().manual_seed(cfg.seed + 1 + offset)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2 + offset)
        self.prompt_gen = torch.Generator().manual_seed(cfg.seed + 3)
        self.replay = build_replay(cfg.exploration.replay)
        self.wandb_id = None
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.tracker = Tracker(cfg.logger, self.run_dir, self.run_name, self._config_dict(), resume_id=self.wandb_id,
                               enabled=self.dist.is_main)
        self.tracker.summary({**model_summary(self.model), "world_size": self.dist.world_size})

    def _config_dict(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True)

    # ----------------------------------------------------------------- one step
    def _prompt_features(self, indices: list[int]) -> torch.Tensor:
        """Frozen (adapters off) prompt representations for a conditioned log Z: the last prompt
        position's hidden state, [P, H]. (Mean pooling was measured to be nearly identical for two
        chat prompts, cosine 0.97, as the shared template dominates; the last position, which the
        policy itself conditions on, separates them: cosine 0.77.)"""
        missing = [i for i in indices if i not in self.prompt_features]
        if missing:
            prompts = self._prompt_batch(missing)
            decoder, _, _ = decoder_and_head(self.model)
            with torch.no_grad(), reference_mode(self.model):
                hidden, _ = run_decoder(decoder, input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                        position_ids=prompts.position_ids(), use_cache=False)
            for i, feature in zip(missing, hidden[:, -1].float()):
                self.prompt_features[i] = feature
        return torch.stack([self.prompt_features[i] for i in indices])

    def _prompt_batch(self, indices: list[int]) -> PromptBatch:
        return PromptBatch.build([self.task.prompt_tokens[i] for i in indices], [self.task.prompts[i] for i in indices],
                                 self.tokenizer.pad_token_id, self.device)

    def _choose_prompts(self) -> list[int]:
        """`prompts_per_step` prompts for this process: its slice of one shared draw for all processes."""
        n = len(self.task.records)
        k = self.cfg.trainer.prompts_per_step
        total, start = k * self.dist.world_size, k * self.dist.rank
        order = torch.randperm(n, generator=self.prompt_gen).tolist()
        chosen = [order[i % n] for i in range(total)]
        return chosen[start: start + k]

    def collect(self) -> StepBatch:
        """Sample K completions per prompt (some replayed), and score them with the reward."""
        cfg, tcfg = self.cfg, self.cfg.trainer
        t0 = time.perf_counter()
        indices = self._choose_prompts()
        prompts = self._prompt_batch(indices)
        k = tcfg.samples_per_prompt
        n_replay = int(round(exploration.replay_fraction_at(cfg.exploration, self.global_step) * k))
        replayed = []  # (row, entry)
        if n_replay and self.replay is not None:
            for row, i in enumerate(indices):
                key = self.task.prompts[i] if cfg.exploration.replay.scope == "prompt" else None
                if self.replay.size(key) > 0:
                    replayed += [(row, e) for e in self.replay.sample(key, n_replay, self.behaviour_gen,
                                                                       self._log_reward_fn())]
        n_fresh = [k - sum(1 for r, _ in replayed if r == row) for row in range(len(indices))]
        group = torch.tensor([row for row, m in enumerate(n_fresh) for _ in range(m)], dtype=torch.long)
        temps = exploration.behaviour_temperatures(cfg.exploration, len(group), self.behaviour_gen)
        eps = exploration.epsilon_at(cfg.exploration, self.global_step)
        traj = sample(self.model, self.tokenizer, prompts, group.to(self.device), self.task.constraints,
                      temperature=temps.to(self.device), epsilon=eps, generator=self.sample_gen,
                      share_prefill=tcfg.share_prompt_prefill)
        t1 = time.perf_counter()
        fresh_prompts = [self.task.prompts[indices[int(g)]] for g in group]
        score = call_reward(self.reward, fresh_prompts, traj.texts,
                            **self.task.reward_kwargs([indices[int(g)] for g in group]))
        t2 = time.perf_counter()
        if replayed:
            traj = merge_replayed(traj, replayed, self.task.constraints.eos_id, self.device)
            score = torch.cat([score, torch.tensor([float(e.score) for _, e in replayed])])
        from_replay = torch.zeros(len(traj), dtype=torch.bool)
        from_replay[len(group):] = True
        timings = {"time/sample": t1 - t0, "time/reward": t2 - t1}
        return StepBatch(prompts, indices, traj, score, from_replay, timings,
                         temperature_mean=float(temps.mean()) if len(temps) else 1.0, epsilon=eps)

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

    def _log_reward_fn(self):
        beta = beta_at(self.cfg.objective, self.global_step)
        floor = self.cfg.objective.log_reward_min
        return lambda scores: log_reward(torch.as_tensor(scores, dtype=torch.float32), beta, floor)

    def train_step(self, batch: StepBatch) -> dict:
        cfg, ocfg = self.cfg, self.cfg.objective
        traj = batch.traj
        dev = self.device
        group = traj.group.to(dev)
        beta = beta_at(ocfg, self.global_step)
        t0 = time.perf_counter()
        needs_ref = ocfg.ref_weight != 0 or (ocfg.name == "rloo" and ocfg.kl_coef)
        log_ref = None
        ref_lp = None
        if needs_ref:
            with torch.no_grad(), reference_mode(self.model):
                ref_lp = score_completions(self.model, batch.prompts, group, traj.tokens.to(dev), traj.lengths.to(dev),
                                           self.task.constraints, self.task.constraints.eos_id,
                                           cfg.trainer.share_prompt_prefill, cfg.trainer.score_chunk_rows,
                                           want_eos=ocfg.name == "subtb")
            log_ref = ref_lp.total().float()
        score = batch.score.to(dev)
        log_r = log_reward(score, beta, ocfg.log_reward_min, ocfg.ref_weight, log_ref)
        want_eos = ocfg.name == "subtb"
        tokens, lengths = traj.tokens.to(dev), traj.lengths.to(dev)

        def score_rows(rows):
            return score_completions(self.model, batch.prompts, group[rows], tokens[rows], lengths[rows],
                                     self.task.constraints, self.task.constraints.eos_id,
                                     cfg.trainer.share_prompt_prefill, cfg.trainer.score_chunk_rows, want_eos=want_eos)

        micro = cfg.trainer.micro_batch_size
        accumulate = 0 < micro < len(traj)
        everything = slice(None)
        if accumulate:
            # Micro-batching: log P_F of the whole batch without gradients first; the loss is then a
            # function of those numbers (leaves), and after its backward each micro-batch is rescored
            # with gradients and backpropagated with the leaves' gradients: the same gradient as one
            # pass over the batch, with the activations of only `micro_batch_size` samples held at once.
            with torch.no_grad():
                lp = score_rows(everything)
            lp.token = lp.token.float().requires_grad_()
            if want_eos:
                lp.eos = lp.eos.float().requires_grad_()
        else:
            lp = score_rows(everything)
        log_pf = lp.total().float()
        log_z = None
        if self.log_z is not None:
            if ocfg.log_z_init is None and self.global_step == 0:
                # log Z from the first batch: with long completions log P_F is around -100 and a
                # log Z started at 0 would need a thousand steps at log_z_lr = 0.1 to get there.
                self.log_z.initialise(self.dist.mean(float((log_r - log_pf.detach()).mean())))
            log_z = self.log_z(self._prompt_features(batch.prompt_indices))[group]
        obj_batch = ObjectiveBatch(log_pf=log_pf, log_reward=log_r.detach(), score=score, group=group, log_z=log_z,
                                   log_ref=log_ref, lengths=traj.lengths.to(dev))
        if want_eos:
            obj_batch.log_pf_tokens = lp.token.float()
            obj_batch.log_pf_stop = lp.eos.float()
            obj_batch.prefix_log_reward = self._prefix_log_rewards(batch, beta, ref_lp)
        loss, diag = self.objective(obj_batch)
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        finite = self.dist.all_true(bool(torch.isfinite(loss)))  # every process skips, or none does
        grad_norm = float("nan")
        if finite:
            loss.backward()
            if accumulate:
                self._backward_micro_batches(score_rows, lp, len(traj), micro)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.dist.average_gradients(params)  # data parallel: the mean gradient over processes
            grad_norm = self.dist.clip_grad_norm(params, cfg.trainer.grad_clip)
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_row >= cfg.trainer.max_nonfinite_steps:
                raise GFODGError(
                    f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (step {self.global_step}); "
                    "stopping. The last good checkpoint is intact. Lower trainer.lr, raise "
                    "objective.log_reward_min, or check the reward.")
        t2 = time.perf_counter()
        metrics = self._step_metrics(batch, loss, log_pf, log_r, log_z, diag, beta, grad_norm, finite)
        metrics.update(batch.timings)
        metrics["time/score_backward"] = t2 - t0  # reference pass, scoring, backward, optimiser
        self._add_to_replay(batch)
        return metrics

    @staticmethod
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

    def _prefix_log_rewards(self, batch: StepBatch, beta: float, ref_lp) -> torch.Tensor:
        traj = batch.traj
        prefixes = [[self.tokenizer.decode(tokens[:t], skip_special_tokens=True) for t in range(len(tokens))]
                    for tokens in traj.token_lists()]
        prompts = [batch.prompts.texts[int(g)] for g in traj.group]
        kwargs = self.task.reward_kwargs([batch.prompt_indices[int(g)] for g in traj.group])
        scores = torch.as_tensor(self.reward.score_prefixes(prompts, prefixes, **kwargs),
                                 dtype=torch.float32).to(self.device)
        width = traj.tokens.shape[1]
        if scores.shape[1] < width:
            pad = torch.full((scores.shape[0], width - scores.shape[1]), -math.inf, device=self.device)
            scores = torch.cat([scores, pad], dim=1)
        log_ref = None
        if ref_lp is not None and self.cfg.objective.ref_weight:
            before = torch.cumsum(ref_lp.token, 1) - ref_lp.token
            log_ref = before + ref_lp.eos  # log p_ref(y_<t, EOS)
        floor = self.cfg.objective.log_reward_min
        value = scores[:, :width] / beta
        if log_ref is not None:
            value = value + self.cfg.objective.ref_weight * log_ref
        # -inf stays -inf here: such a prefix cannot terminate and is left out of SubTB's pairs.
        return torch.where(torch.isfinite(value), value.clamp(min=floor), value)

    def _add_to_replay(self, batch: StepBatch) -> None:
        if self.replay is None:
            return
        fresh = [i for i in range(len(batch.traj)) if not batch.from_replay[i]]
        tokens = batch.traj.token_lists()
        self.replay.add_batch([batch.prompts.texts[int(batch.traj.group[i])] for i in fresh],
                              [tuple(tokens[i]) for i in fresh], [batch.traj.texts[i] for i in fresh],
                              [float(batch.score[i]) for i in fresh], log_reward_fn=self._log_reward_fn())

    def _step_metrics(self, batch, loss, log_pf, log_r, log_z, diag, beta, grad_norm, finite) -> dict:
        traj = batch.traj
        score = batch.score
        valid = torch.isfinite(score)
        group = traj.group.to(log_pf.device)
        ratio = (log_r - log_pf).detach()
        var_per_prompt = []
        for g in group.unique():
            values = ratio[group == g]
            if values.numel() > 1:
                var_per_prompt.append(float(values.var()))
        residual = diag["residual"].float()
        max_len = self.task.constraints.max_new_tokens
        fresh = ~batch.from_replay
        new = [t.strip() for t, s, f in zip(traj.texts, score.tolist(), fresh.tolist()) if f and math.isfinite(s)]
        for part in self.dist.gather(new):  # every process's finds
            self.found.update(part)
        m = {
            "discovery/distinct_valid": len(self.found),
            "loss": float(loss.detach()),
            "log_pf/mean": float(log_pf.detach().mean()),
            "log_reward/mean": float(log_r.mean()),
            "residual/mean": float(residual.mean()),
            "residual/std": float(residual.std()) if residual.numel() > 1 else 0.0,
            "var_log_ratio": float(np.mean(var_per_prompt)) if var_per_prompt else float("nan"),
            "beta": beta,
            "reward/mean": float(score[valid].mean()) if valid.any() else float("nan"),
            "reward/valid_fraction": float(valid.float().mean()),
            "completion/length_mean": float(traj.lengths.float().mean()),
            "completion/eos_fraction": float((traj.lengths < max_len).float().mean()),
            "completion/unique_fraction": len(set(traj.texts)) / max(1, len(traj.texts)),
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "nonfinite_steps": self.nonfinite_total,
            "skipped_step": 0.0 if finite else 1.0,
            "exploration/temperature_mean": batch.temperature_mean,
            "exploration/epsilon": batch.epsilon,
            "exploration/replay_fraction": float(batch.from_replay.float().mean()),
            "exploration/fresh_unique_fraction": len(set(t for t, f in zip(traj.texts, fresh) if f)) / max(1, int(fresh.sum())),
        }
        if log_z is not None:
            m["log_z"] = float(log_z.detach().mean())
        elif "log_z_estimate" in diag:
            m["log_z"] = float(diag["log_z_estimate"].mean())
        terms = getattr(self.reward, "last_terms", None)
        if terms:
            for name, values in terms.items():
                values = torch.as_tensor(values, dtype=torch.float32)
                fin = values[torch.isfinite(values)]
                m[f"rewards/{name}/mean"] = float(fin.mean()) if fin.numel() else float("nan")
                m[f"rewards/{name}/std"] = float(fin.std()) if fin.numel() > 1 else 0.0
        if self.replay is not None:
            stats = self.replay.stats(self._log_reward_fn())
            m["replay/size"] = stats.get("size", len(self.replay))
            for key in ("mean_log_reward", "max_log_reward"):
                if key in stats:
                    m[f"replay/{key}"] = stats[key]
        return m

    # ----------------------------------------------------------------- checkpoints
    def _process_state(self) -> dict:
        """What differs between processes: RNG streams and the replay buffer."""
        return {
            "rng": {"python": random.getstate(), "numpy": _numpy_state_to_plain(np.random.get_state()),
                    "torch": torch.get_rng_state(), "behaviour": self.behaviour_gen.get_state(),
                    "sample": self.sample_gen.get_state().cpu(), "prompt": self.prompt_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "replay": self.replay.state_dict() if self.replay is not None else None,
            # FSDP: each process's shard of the optimizer state (the whole state otherwise, in "optimizer")
            "optimizer": self.dist.local_optimizer_state(self.optimizer) if self.dist.sharded else None,
        }

    def _state(self, processes: Optional[list] = None) -> dict:
        own = processes[0] if processes else self._process_state()
        return {
            "step": self.global_step,
            "log_z": self.log_z.state_dict() if self.log_z is not None else None,
            "optimizer": None if self.dist.sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": own["rng"],
            "replay": own["replay"],
            "processes": processes if processes and len(processes) > 1 else None,
            "nonfinite_total": self.nonfinite_total,
            "found": sorted(self.found),
            "wandb_id": self.tracker.run_id if getattr(self, "tracker", None) else self.wandb_id,
            "base_model": self.base_path,
            "run_name": self.run_name,
        }

    def save_checkpoint(self) -> Optional[Path]:
        """Rank 0 writes the checkpoint, with every process's RNG streams and replay buffer in it."""
        processes = self.dist.gather(self._process_state()) if self.dist.enabled else None
        adapter_state = self.dist.full_trainable_state(self.model)  # FSDP: the LoRA weights whole (all ranks)
        path = None
        if self.dist.is_main:
            config_yaml = OmegaConf.to_yaml(self.cfg, resolve=True)
            path = checkpoints.save_checkpoint(Path(self.cfg.paths.checkpoints) / self.run_name, self.global_step,
                                               self.model, self._state(processes), config_yaml,
                                               self.cfg.trainer.keep_checkpoints, adapter_state)
            log.info("checkpoint: %s", path)
        self.dist.barrier()
        return path

    def _restore(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = checkpoints.load_state(path)
        if state.get("base_model") != self.base_path:
            raise CheckpointError(
                f"checkpoint {path} was made for base model {state.get('base_model')!r}, not {self.base_path!r}; "
                "resume it with the model it was trained with.")
        adapter_file = path / "adapter" / "adapter_model.safetensors"
        if not adapter_file.is_file():
            raise CheckpointError(f"checkpoint {path} has no adapter weights ({adapter_file} missing).")
        saved = load_file(str(adapter_file), device=str(self.device))
        if self.dist.sharded:  # each process keeps its shard of each saved tensor
            from peft import get_peft_model_state_dict

            targets = get_peft_model_state_dict(self.model)  # the saved names -> the parameters (shared storage)
            if set(targets) != set(saved):
                raise CheckpointError(f"checkpoint {path}: its adapter's tensors do not match this model's LoRA "
                                      "parameters; resume with the model and LoRA settings it was trained with.")
            with torch.no_grad():
                for key, target in targets.items():
                    self.dist.load_full_into(target, saved[key])
        else:
            set_peft_model_state_dict(self.model, saved)
        if self.log_z is not None and state["log_z"] is not None:
            self.log_z.load_state_dict(state["log_z"])
        processes = state.get("processes") or None
        saved_world = len(processes) if processes else 1
        if saved_world != self.dist.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {saved_world} training process(es); this launch has "
                f"{self.dist.world_size}. Resume it with --num_processes {saved_world}.")
        own = processes[self.dist.rank] if processes else {"rng": state["rng"], "replay": state.get("replay")}
        if (state["optimizer"] is None) != self.dist.sharded:
            how = ("with FSDP sharding; resume it under --config_file configs/accelerate/fsdp.yaml" if state["optimizer"] is None
                   else "without FSDP sharding; resume it with configs/accelerate/ddp.yaml or as a single process")
            raise CheckpointError(f"checkpoint {path} was written {how}, with {saved_world} process(es).")
        if self.dist.sharded:
            self.dist.load_local_optimizer_state(self.optimizer, own["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = own["rng"]
        random.setstate(_to_python_state(rng["python"]))
        np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        self.behaviour_gen.set_state(rng["behaviour"])
        self.sample_gen.set_state(rng["sample"])
        if rng.get("prompt") is not None:
            self.prompt_gen.set_state(rng["prompt"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.replay is not None and own.get("replay") is not None:
            self.replay.load_state_dict(own["replay"])
        self.global_step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.found = set(state.get("found") or [])
        self.wandb_id = state.get("wandb_id")
        log.info("resumed from %s at step %d", path, self.global_step)

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
        ecfg = self.cfg.task.evaluation
        result, rows = evaluate(self.model, self.tokenizer, self.task, ecfg.n_samples, ecfg.batch_size,
                                beta=beta_at(self.cfg.objective, self.global_step), seed=self.cfg.seed + 1000,
                                share_prefill=self.cfg.trainer.share_prompt_prefill, exact=ecfg.exact)
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
                batch = self.last_batch
                if self.dist.enabled:
                    metrics = merge_metrics(self.dist.gather(metrics))
                    metrics["world_size"] = self.dist.world_size
                    self.stop_requested = self.dist.any_true(self.stop_requested)  # all stop at the same step
                self.tracker.log(metrics, step=self.global_step)
                if cfg.trainer.sample_table_every and self.global_step % cfg.trainer.sample_table_every == 0:
                    rows = [{"step": self.global_step, "prompt": batch.prompts.texts[int(g)], "completion": t,
                             "score": float(s), "replayed": bool(r)}
                            for g, t, s, r in zip(batch.traj.group, batch.traj.texts, batch.score, batch.from_replay)]
                    rows = [row for part in self.dist.gather(rows) for row in part]
                    self.tracker.log_samples(rows, step=self.global_step)
                if cfg.trainer.checkpoint_every and self.global_step % cfg.trainer.checkpoint_every == 0:
                    self.save_checkpoint()
                progress.update(1)
                shown = {"loss": f"{metrics['loss']:.3f}", "reward": f"{metrics['reward/mean']:.2f}",
                         "valid": f"{metrics['reward/valid_fraction']:.2f}"}
                if "log_z" in metrics:
                    shown["log_z"] = f"{metrics['log_z']:.2f}"
                progress.set_postfix(shown)
        if not (cfg.trainer.checkpoint_every and self.global_step % cfg.trainer.checkpoint_every == 0):
            self.save_checkpoint()  # (a checkpoint of this step was just written otherwise)
        if self.stop_requested:
            log.warning("stopped by a signal at step %d; checkpoint saved. Continue with resume=auto run_name=%s",
                        self.global_step, self.run_name)
            return {"interrupted": True, "step": self.global_step}
        adapter_dir = Path(cfg.paths.adapted_models) / self.run_name
        adapter_state = self.dist.full_trainable_state(self.model)
        if self.dist.is_main:
            save_adapter(self.model, adapter_dir, adapter_state)
        self.dist.barrier()
        after = self.evaluate("after")
        summary = {"before": before, "after": after, "steps": self.global_step, "adapter": str(adapter_dir)}
        if not self.dist.is_main:
            return summary
        self.tracker.summary({f"eval_after/{k}": v for k, v in after.items() if isinstance(v, (int, float))})
        return summary

    def close(self, exit_code: int = 0) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.finish(exit_code)
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


def lr_factor(tcfg):
    """Linear warm-up over `warmup_steps`, then constant, or a linear/cosine decay to
    `min_lr_ratio` at `max_steps` (decay steadies the final policy: the sampler that is evaluated)."""
    warmup, total, floor = max(0, tcfg.warmup_steps), max(1, tcfg.max_steps), tcfg.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if tcfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1 - progress if tcfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * shape

    return factor


def save_adapter(model, dest: Path, state: Optional[dict] = None) -> Path:
    """The final adapter, loadable by plain `PeftModel.from_pretrained(base, dest)`; written atomically.
    state: the trainable tensors whole, where the model holds only shards of them (FSDP)."""
    extra = {"state_dict": state} if state is not None else {}
    return checkpoints.write_folder_atomic(dest, lambda tmp: model.save_pretrained(tmp, **extra))


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


def build_optimizer(name: str, groups: list, device: torch.device):
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ConfigError("trainer.optimizer=paged_adamw_8bit needs a CUDA device; use adamw on the CPU.")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups)
    raise ConfigError(f"trainer.optimizer={name!r} is not one of adamw, paged_adamw_8bit.")


def build_replay(cfg):
    if not cfg.enabled:
        return None
    from gf_odg.exploration.replay import ReplayBuffer

    embed_fn = None
    if cfg.dedup == "embedding":
        from gf_odg.rewards.embedding import embed

        embed_fn = embed
    return ReplayBuffer.from_config(cfg, embed_fn)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _numpy_state_to_plain(state) -> list:
    """np.random state with its key array as a list, so the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(state) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)


def _to_python_state(state):
    """random.getstate() round-trips through torch.save as lists; setstate wants tuples."""
    if isinstance(state, list):
        return tuple(_to_python_state(s) for s in state)
    return state


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
