"""Every GFlowNet objective x every behaviour policy trains toward the target it states (issue 17).

The enumerable problem of tests/enumerable.py in its short form (12 completions of 1..2 letters, two
prompts), made hard enough that a plausible wrong implementation fails: beta = 2 with the table
rescaled, a third of the completions -inf (one of them, "b", a prefix of valid ones), several scoring
chunks, partition functions that differ between the prompts (vargrad, a conditioned log Z) or sit
away from log Z's initial value (a scalar one), and in the on-policy column lambda = 1 with p_ref
computed independently (the base model's own unmasked probability, EOS included). Each cell trains
the tiny model for 100 steps and computes the policy's exact distribution: TV to the target,
invalid mass included, must be <= 0.05 for every prompt, and a learned log Z must match log Z(x).
RLOO, the reward maximiser, trained the same way must collapse onto the best completion.

One process; the 2-process cells of the matrix belong with the distributed tests.

NOT YET MET, so not collected by `uv run pytest` (its name does not start with test_): at 100 steps
and K = 48 only vargrad on-policy reaches TV <= 0.05; the other cells end at 0.05-0.12 and SubTB at
0.10-0.17 (docs/results/matrix.md). It runs on its own, about 5 minutes on 2 cores:

    uv run pytest -n 0 tests/matrix_check.py -s
"""

from __future__ import annotations

import time

import pytest

from enumerable import (PROMPTS, SHORT, SHORT_INVALID, enumerable_cfg, exact_probs, log_weights, set_scores,
                        target_probs, tv_to)
from gf_odg.training.trainer import Trainer

BETA = 2.0
STEPS = 100
COMMON = [
    f"objective.beta={BETA}", "objective.log_reward_min=-10",
    "trainer.prompts_per_step=2", "trainer.samples_per_prompt=48",
    "trainer.lr=1e-2", "trainer.log_z_lr=0.3", "trainer.log_z_head_lr=0.03", "trainer.grad_clip=1",
    "trainer.lr_schedule=cosine", "trainer.min_lr_ratio=0.0", f"trainer.max_steps={STEPS}",
    "task.max_new_tokens=3", "trainer.score_chunk_rows=16",  # 96 rows: one position per chunk, three chunks
]
OBJECTIVES = {
    # name: (overrides, log Z of each prompt's target)
    "tb-scalar": (["objective=tb"], (2.0, 2.0)),  # one log Z for both prompts, away from its init 0
    "tb-conditioned": (["objective=tb", "objective.log_z=conditioned"], (0.5, 2.5)),
    "vargrad": (["objective=vargrad"], (0.5, 2.5)),
    # a scalar log Z anchors s_0: one value for both prompts. The floor at -5 (target mass on the
    # invalid completions 0.004): at -10 SubTB's pairs through "b" dominate the clipped gradient and
    # 100 steps end at TV 0.61 / 0.33; at -5, 0.17 / 0.10 (measured, on-policy).
    "subtb": (["objective=subtb", "objective.log_reward_min=-5"], (2.0, 2.0)),
}
TEMPERED = ["exploration=default", "exploration.p_temper=1.0", "exploration.temper_lo=1.0",
            "exploration.temper_hi=1.5", "exploration.epsilon=0.05"]
REPLAY = [*TEMPERED, "exploration.replay.enabled=true", "exploration.replay.fraction=0.5",
          "exploration.replay.priority=uniform"]
BEHAVIOURS = {
    # lambda = 1 costs a reference pass over the whole vocabulary (49k columns, the cell's time x2.5):
    # one column of the matrix carries it.
    "on-policy": ["exploration=on_policy", "objective.ref_weight=1"],
    "tempered-eps": TEMPERED,
    "replay-prompt": [*REPLAY, "exploration.replay.scope=prompt"],
    "replay-global": [*REPLAY, "exploration.replay.scope=global"],
}


def train_cell(tmp_path, overrides: list[str], log_z: tuple[float, float],
               spread: float = 4.5) -> tuple[Trainer, list[dict]]:
    objective = next(o.split("=")[1] for o in overrides if o.startswith("objective="))
    rest = [o for o in overrides if not o.startswith("objective=")]
    cfg = enumerable_cfg(tmp_path, objective, prompts=PROMPTS, seeds=[0, 1], extra=[*COMMON, *rest])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    weights = [log_weights(seed, z, SHORT, SHORT_INVALID, spread) for seed, z in zip((0, 1), log_z)]
    set_scores(trainer, weights, cfg.objective.beta, cfg.objective.ref_weight)
    while trainer.global_step < cfg.trainer.max_steps:
        trainer.step()
    return trainer, weights


@pytest.mark.slow
@pytest.mark.parametrize("behaviour", list(BEHAVIOURS))
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_matrix_cell_reaches_its_target(tmp_path, objective, behaviour):
    start = time.perf_counter()
    overrides, log_z = OBJECTIVES[objective]
    trainer, weights = train_cell(tmp_path, [*overrides, *BEHAVIOURS[behaviour]], log_z)
    tvs = [tv_to(exact_probs(trainer, i), w) for i, w in enumerate(weights)]
    print(f"cell {objective} x {behaviour}: TV {tvs[0]:.4f} {tvs[1]:.4f} in {time.perf_counter() - start:.1f} s")
    assert max(tvs) <= 0.05, tvs
    if trainer.log_z is not None:  # log Z learned per prompt (conditioned) or shared (scalar)
        learned = trainer.log_z(trainer._prompt_features([0, 1])).tolist()
        assert learned == pytest.approx(list(log_z), abs=0.15), learned


@pytest.mark.slow
def test_rloo_collapses_onto_a_best_completion(tmp_path):
    """The contrast that motivates the project: under the same plumbing, on a flat target (no
    completion above 0.25), reward maximisation puts most of its mass on one of the best completions."""
    overrides = ["objective=rloo", "objective.ref_weight=0", "exploration=on_policy"]
    trainer, weights = train_cell(tmp_path, overrides, (0.5, 2.5), spread=1.0)
    for i, w in enumerate(weights):
        probs = exact_probs(trainer, i)
        mode = max(probs, key=probs.get)
        ranked = sorted(w, key=w.get, reverse=True)
        print(f"rloo prompt {i}: {probs[mode]:.3f} on {mode!r}, rank {ranked.index(mode) if mode in w else None}")
        assert max(target_probs(w).values()) < 0.25
        assert probs[mode] >= 0.8 and mode in ranked[:3], (mode, probs[mode], ranked)
        assert tv_to(probs, w) >= 0.5
