"""The replay buffer: sampling frequencies against closed-form priorities, dedup, eviction, resume."""

import math
import random

import pytest
import torch

from gf_odg.errors import ConfigError
from gf_odg.exploration.replay import RANK_K, ReplayBuffer, _codes, _levenshtein, edit_distances


def tempered(beta):
    return lambda scores: scores / beta


def draw_frequencies(buffer, prompt, n, log_reward_fn, seed=0):
    entries = buffer.entries(prompt)
    index = {(e.prompt, e.tokens): i for i, e in enumerate(entries)}
    counts = torch.zeros(len(entries), dtype=torch.float64)
    for e in buffer.sample(prompt, n, torch.Generator().manual_seed(seed), log_reward_fn):
        counts[index[(e.prompt, e.tokens)]] += 1
    return counts / n


def assert_matches(freq, probs, n):
    sigma = (probs * (1 - probs) / n).sqrt()
    assert (freq - probs).abs().max() <= (5 * sigma).max(), (freq, probs)


def naive_levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_edit_distances_match_naive_dp():
    rng = random.Random(0)
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 9))) for _ in range(60)]
    for query in words[:20] + ["", "kitten"]:
        got = edit_distances(query, words + ["sitting"]).tolist()
        assert got == [naive_levenshtein(query, w) for w in words + ["sitting"]]
    assert edit_distances("kitten", ["sitting"]).tolist() == [3]
    assert edit_distances("abc", [""]).tolist() == [3]


def test_bounded_levenshtein_is_exact_up_to_the_bound():
    rng = random.Random(1)
    words = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 12))) for _ in range(80)]
    bound = torch.tensor([rng.randint(0, 4) for _ in words])
    for query in words[:10]:
        got = _levenshtein(_codes(query), [_codes(w) for w in words], bound).tolist()
        exact = [naive_levenshtein(query, w) for w in words]
        assert got == [d if d <= b else b + 1 for d, b in zip(exact, bound.tolist())]


def test_edit_dedup_matches_a_brute_force_reference():
    rng = random.Random(2)
    threshold = 0.25
    buffer = ReplayBuffer(capacity=10_000, dedup="edit", dedup_threshold=threshold)
    reference = {}  # text -> score, insertion ordered
    for i in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(3, 10)))
        score = rng.random()
        near = [t for t in reference if naive_levenshtein(text, t) / max(len(text), len(t)) <= threshold]
        entered = not any(reference[t] >= score for t in near)
        if entered:
            for t in near:
                del reference[t]
            reference[text] = score
        assert buffer.add("p", [i], text, score) == entered
    assert [(e.text, e.score) for e in buffer.entries()] == list(reference.items())


SCORES = [0.0, 1.0, 2.0, 2.0, -1.0, 3.5]


@pytest.mark.parametrize("priority", ["uniform", "rank", "softmax"])
def test_sampling_frequencies_match_priorities(priority):
    beta, temperature, n = 2.0, 0.5, 20_000
    buffer = ReplayBuffer(capacity=10, priority=priority, priority_temperature=temperature)
    for i, s in enumerate(SCORES):
        assert buffer.add("p", [i, 0], f"t{i}", s)
    scores = torch.tensor(SCORES, dtype=torch.float64)
    if priority == "uniform":
        expected = torch.full((6,), 1 / 6, dtype=torch.float64)
    elif priority == "rank":
        rank = torch.tensor([4, 3, 1, 2, 5, 0], dtype=torch.float64)  # tie 2.0/2.0: the older ranks first
        weights = 1 / (RANK_K * 6 + rank)
        expected = weights / weights.sum()
    else:
        expected = torch.softmax(scores / beta / temperature, dim=0)
    probs = buffer.probabilities("p", tempered(beta))
    assert torch.allclose(probs, expected)
    assert_matches(draw_frequencies(buffer, "p", n, tempered(beta)), expected, n)


def test_ratio_priority_draws_the_under_sampled_first_and_survives_a_checkpoint(tmp_path):
    beta, temperature, n = 2.0, 0.5, 20_000
    buffer = ReplayBuffer(capacity=10, priority="ratio", priority_temperature=temperature)
    for i, s in enumerate(SCORES):
        assert buffer.add("p", [i, 0], f"t{i}", s)
    # nothing scored yet: uniform; then only the entries not scored yet (seeded ones come first)
    assert torch.allclose(buffer.probabilities("p", tempered(beta)), torch.full((6,), 1 / 6, dtype=torch.float64))
    log_pf = [-1.0, -4.0, -0.5, -2.0, -3.0, -6.0]
    buffer.record_log_pf(["p"] * 5, [[i, 0] for i in range(5)], log_pf[:5])
    buffer.record_log_pf(["p", "other"], [[9, 9], [5, 0]], [0.0, 0.0])  # not in the buffer: ignored
    assert buffer.probabilities("p", tempered(beta)).tolist() == [0, 0, 0, 0, 0, 1]
    buffer.record_log_pf(["p"], [[5, 0]], [log_pf[5]])
    scores = torch.tensor(SCORES, dtype=torch.float64)
    expected = torch.softmax((scores / beta - torch.tensor(log_pf, dtype=torch.float64)) / temperature, dim=0)
    probs = buffer.probabilities("p", tempered(beta))
    assert torch.allclose(probs, expected)
    assert int(probs.argmax()) == 5 and int(probs.argmin()) == 0  # R/P_F: e^1.75 / e^-6 most, e^0 / e^-1 least
    assert_matches(draw_frequencies(buffer, "p", n, tempered(beta)), expected, n)
    buffer.record_log_pf(["p"], [[5, 0]], [-1.0])  # the latest score counts
    assert int(buffer.probabilities("p", tempered(beta)).argmax()) == 1
    assert [e.text for e in buffer.stalest("p", 3)] == ["t0", "t1", "t2"]  # recorded together, first
    assert [e.text for e in buffer.stalest("p", 6)][-1] == "t5"  # recorded last
    buffer.add("p", [7, 0], "t7", 0.0)
    assert buffer.stalest("p", 1)[0].text == "t7"  # never recorded: the stalest of all
    path = tmp_path / "replay.pt"
    torch.save(buffer.state_dict(), path)
    restored = ReplayBuffer(capacity=10, priority="ratio", priority_temperature=temperature)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(restored.probabilities("p", tempered(beta)), buffer.probabilities("p", tempered(beta)))


def test_retempering_changes_priorities_not_scores():
    buffer = ReplayBuffer(capacity=10, priority="softmax")
    for i, s in enumerate(SCORES):
        buffer.add("p", [i], f"t{i}", s)
    before = [e.score for e in buffer.entries()]
    scores = torch.tensor(SCORES, dtype=torch.float64)
    for beta in (0.5, 1.0, 4.0):
        assert torch.allclose(buffer.probabilities("p", tempered(beta)), torch.softmax(scores / beta, dim=0))
    assert not torch.allclose(buffer.probabilities("p", tempered(0.5)), buffer.probabilities("p", tempered(4.0)))
    freq_cold = draw_frequencies(buffer, "p", 20_000, tempered(0.5))
    freq_hot = draw_frequencies(buffer, "p", 20_000, tempered(4.0))
    assert freq_cold[5] > 0.8 > 0.4 > freq_hot[5]
    assert [e.score for e in buffer.entries()] == before
    stats = buffer.stats(tempered(2.0))
    assert stats == {"size": 6, "prompts": 1, "mean_log_reward": pytest.approx(sum(SCORES) / 12),
                     "max_log_reward": 1.75}


def test_exact_duplicates_never_enter_twice():
    buffer = ReplayBuffer(capacity=10, priority="uniform")
    assert buffer.add("p", [1, 2, 0], "ab", 1.0)
    assert not buffer.add("p", [1, 2, 0], "ab", 0.5)
    assert [e.score for e in buffer.entries()] == [1.0]
    assert not buffer.add("p", torch.tensor([1, 2, 0]), "ab", 3.0)  # raises the stored score
    assert buffer.add("p", [7, 0], "c", 0.0)
    assert [(e.tokens, e.score) for e in buffer.entries()] == [((1, 2, 0), 3.0), ((7, 0), 0.0)]  # age kept
    assert buffer.entries()[0].score == 3.0 and buffer.entries()[0].text == "ab"
    assert buffer.add("q", [1, 2, 0], "ab", 1.0)  # same tokens, another prompt: another trajectory
    assert len(buffer) == 3 and buffer.size("p") == 2 and buffer.size("q") == 1
    drawn = buffer.sample("p", 500, torch.Generator().manual_seed(1))
    assert len(drawn) == 500 and {e.tokens for e in drawn} == {(1, 2, 0), (7, 0)}


def test_edit_near_duplicates_better_replaces_worse_rejected():
    buffer = ReplayBuffer(capacity=10, dedup="edit", dedup_threshold=0.1)
    text = "the quick brown fox jumps"  # 25 chars: one or two edits are within 0.1
    assert buffer.add("p", [1], text, 1.0)
    assert not buffer.add("p", [2], "the quick brown fox jumped", 0.5)  # worse near-dup rejected
    assert buffer.add("p", [3], "the quick brown fix jumps", 2.0)  # better near-dup replaces
    assert [(e.tokens, e.score) for e in buffer.entries()] == [((3,), 2.0)]
    assert buffer.add("p", [4], "a completely different line", 0.1)  # far apart: both kept
    assert buffer.add("q", [5], text, 0.0)  # dedup is per prompt
    assert len(buffer) == 3
    # a newcomer better than several near-duplicates replaces all of them
    assert buffer.add("p", [6], "the quick brown fix jump", 5.0)
    assert [e.tokens for e in buffer.entries("p")] == [(4,), (6,)]


def test_embedding_near_duplicates():
    calls = []

    def embed(texts):  # unnormalised bag of letters; the buffer normalises
        calls.append(list(texts))
        return torch.tensor([[t.count(c) * 3.0 for c in "abcdefgh"] for t in texts])

    buffer = ReplayBuffer(capacity=10, dedup="embedding", dedup_threshold=0.05, embed_fn=embed)
    assert buffer.add("p", [1], "aabbc", 1.0)
    assert not buffer.add("p", [2], "ababc", 0.5)  # same bag, cosine 1, worse
    assert buffer.add("p", [3], "hhgg", 0.0)  # orthogonal
    assert buffer.add("p", [4], "cbaba", 2.0)  # same bag, better: replaces [1]
    assert [e.tokens for e in buffer.entries()] == [(3,), (4,)]
    # hhggg is at cosine 0.98 to hhgg, and worse
    assert buffer.add_batch(["p", "p"], [[5], [6]], ["ddd", "hhggg"], [1.0, -1.0]) == [True, False]
    assert calls[-1] == ["ddd", "hhggg"]  # a batch is embedded in one call
    with pytest.raises(ConfigError, match="exploration.replay.dedup"):
        ReplayBuffer(capacity=10, dedup="embedding")


def test_capacity_evicts_lowest_score_oldest_first():
    buffer = ReplayBuffer(capacity=3)
    for i, s in enumerate([2.0, 1.0, 1.0]):
        assert buffer.add("p", [i], str(i), s)
    assert not buffer.add("p", [9], "9", 0.5)  # below everything stored: rejected
    assert buffer.add("p", [3], "3", 1.5)  # evicts (1,): lowest, older of the tied 1.0s
    assert [e.tokens for e in buffer.entries()] == [(0,), (2,), (3,)]
    assert buffer.add("p", [4], "4", 1.0)  # ties the lowest: the older one goes
    assert [e.tokens for e in buffer.entries()] == [(0,), (3,), (4,)]
    assert not buffer.add("p", [5], "5", -math.inf)
    assert min(e.score for e in buffer.entries()) == 1.0 and len(buffer) == 3


def test_prompt_scope_keeps_prompts_apart_and_global_shares():
    per_prompt = ReplayBuffer(capacity=2, scope="prompt", priority="softmax")
    shared = ReplayBuffer(capacity=2, scope="global", priority="softmax")
    for buffer in (per_prompt, shared):
        for prompt, base in (("a", 0), ("b", 10)):
            for i in range(3):
                buffer.add(prompt, [base + i], f"{prompt}{i}", float(base + i))
    assert [e.tokens for e in per_prompt.entries("a")] == [(1,), (2,)]
    assert [e.tokens for e in per_prompt.entries("b")] == [(11,), (12,)]
    assert [e.tokens for e in shared.entries()] == [(11,), (12,)]  # b's scores crowd a out
    assert shared.size("a") == 0 and shared.sample("a", 5, torch.Generator()) == []
    gen = torch.Generator().manual_seed(0)
    drawn = per_prompt.sample("a", 1000, gen, tempered(1.0))  # a's softmax, despite b's higher scores
    assert {e.prompt for e in drawn} == {"a"}
    assert sum(e.tokens == (2,) for e in drawn) / 1000 == pytest.approx(1 / (1 + math.exp(-1)), abs=0.05)
    assert {e.prompt for e in per_prompt.sample(None, 1000, gen, tempered(100.0))} == {"a", "b"}


def test_score_filters():
    buffer = ReplayBuffer(capacity=5, min_score=0.0)
    assert not buffer.add("p", [1], "x", -0.1)
    assert buffer.add("p", [2], "y", 0.0)
    by_log_reward = ReplayBuffer(capacity=5, min_log_reward=1.0)
    assert by_log_reward.add_batch(["p", "p"], [[1], [2]], ["x", "y"], [1.0, 3.0], log_reward_fn=tempered(2.0)) \
        == [False, True]
    with pytest.raises(ValueError, match="log_reward_fn"):
        by_log_reward.add("p", [3], "z", 5.0)
    with pytest.raises(ValueError, match="finite"):
        buffer.add("p", [4], "w", float("nan"))


def test_state_dict_round_trip(tmp_path):
    buffer = ReplayBuffer(capacity=4, scope="prompt", priority="rank")
    rng = random.Random(0)
    for step in range(40):
        prompt = rng.choice(["a", "b", "c"])
        buffer.add(prompt, [rng.randint(0, 5), 0], f"s{step}", rng.uniform(-2, 2), extra={"step": step})
    buffer.add("a", list(buffer.entries("a")[0].tokens), "dup", 10.0)  # a raised score keeps its place
    path = tmp_path / "replay.pt"
    torch.save(buffer.state_dict(), path)
    restored = ReplayBuffer(capacity=4, scope="prompt", priority="rank")
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.entries() == buffer.entries()
    for prompt in (None, "a", "b"):
        assert restored.sample(prompt, 50, torch.Generator().manual_seed(7), tempered(1.0)) == \
            buffer.sample(prompt, 50, torch.Generator().manual_seed(7), tempered(1.0))
    smaller = ReplayBuffer(capacity=2)
    smaller.load_state_dict(buffer.state_dict())
    for prompt in "abc":
        kept = sorted(e.score for e in smaller.entries(prompt))
        assert kept == sorted(e.score for e in buffer.entries(prompt))[-2:]


@pytest.mark.parametrize("kwargs, key", [
    ({"capacity": 0}, "capacity"),
    ({"capacity": 2.5}, "capacity"),
    ({"priority_temperature": 0.0}, "priority_temperature"),
    ({"priority_temperature": -1.0}, "priority_temperature"),
    ({"priority": "greedy"}, "priority"),
    ({"scope": "batch"}, "scope"),
    ({"dedup": "fuzzy"}, "dedup"),
    ({"dedup_threshold": 1.5}, "dedup_threshold"),
])
def test_constructor_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=rf"exploration\.replay\.{key}="):
        ReplayBuffer(**{"capacity": 10, **kwargs})


def test_from_config_maps_every_buffer_key():
    from gf_odg.config.schema import ReplayConfig

    cfg = ReplayConfig(enabled=True, capacity=7, scope="global", priority="rank", priority_temperature=2.0,
                       dedup="edit", dedup_threshold=0.2, min_log_reward=-3.0)
    buffer = ReplayBuffer.from_config(cfg)
    assert (buffer.capacity, buffer.scope, buffer.priority, buffer.priority_temperature, buffer.dedup,
            buffer.dedup_threshold, buffer.min_log_reward) == (7, "global", "rank", 2.0, "edit", 0.2, -3.0)
    threads = torch.get_num_threads()
    assert buffer.add("p", [1], "abc", 0.0, log_reward_fn=tempered(1.0))
    assert not buffer.add("p", [2], "xyz", -4.0, log_reward_fn=tempered(1.0))
    assert torch.get_num_threads() == threads  # edit dedup runs single-threaded, then restores


# ---- seeding from the enumerated space (exploration.replay.seed) ------------------------------

def _seeded_trainer(tmp_path, seed: str, extra=()):
    from enumerable import PROMPTS, enumerable_cfg
    from gf_odg.training.trainer import Trainer

    cfg = enumerable_cfg(tmp_path, "tb", prompts=PROMPTS, seeds=[0, 1],
                         extra=["exploration=replay", f"exploration.replay.seed={seed}", *extra])
    # two prompts with different valid sets: prompt 0 drops every completion starting with "b"
    tables = cfg.task.reward.tables
    tables[PROMPTS[0]] = {k: v for k, v in tables[PROMPTS[0]].items() if not k.startswith("b")}
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    return trainer, tables


@pytest.mark.slow
def test_seed_enumerate_fills_the_buffer_with_every_valid_completion_under_its_own_prompt(tmp_path):
    trainer, tables = _seeded_trainer(tmp_path, "enumerate")
    for prompt, table in tables.items():
        entries = trainer.replay.entries(prompt)
        assert {e.text: e.score for e in entries} == pytest.approx(table)  # each with its own prompt's score
        for e in entries:  # tokens end in EOS and decode to the text
            assert e.tokens[-1] == trainer.task.constraints.eos_id
            assert trainer.tokenizer.decode(e.tokens, skip_special_tokens=True) == e.text
    assert len(trainer.replay) == sum(len(t) for t in tables.values())
    # one step records the policy's log P_F of every trained row that is in the buffer (priority=ratio)
    trainer.step()
    batch, recorded = trainer.last_batch, trainer.replay._log_pf
    prompts = [batch.prompts.texts[int(g)] for g in batch.traj.group]
    in_buffer = [(p, tuple(t)) for p, t, s in zip(prompts, batch.traj.token_lists(), batch.score.tolist())
                 if math.isfinite(s)]
    assert in_buffer and all(key in recorded for key in in_buffer)
    log_pf = recorded[in_buffer[0]]
    assert -50 < log_pf < 0


@pytest.mark.slow
def test_ratio_priority_rescores_the_whole_pool_under_the_current_policy(tmp_path):
    from gf_odg.evaluation.exact import completion_log_probs

    trainer, tables = _seeded_trainer(tmp_path, "enumerate", ["exploration.replay.priority=ratio",
                                                               "trainer.samples_per_prompt=8",
                                                               "exploration.replay.rescore=0.5"])
    trainer.step()  # trains: the recorded values are now stale for every entry
    trained = trainer.replay._clock
    prompt_index = trainer.collect().prompt_indices[0]  # rescores the K stalest entries of that prompt
    prompt = trainer.task.prompts[prompt_index]
    entries = trainer.replay.entries(prompt)
    fresh = [trainer.replay._scored_at.get((prompt, e.tokens), 0) > trained for e in entries]
    assert sum(fresh) == 4 < len(entries)  # one draw rescores K / 2 of them, not the pool
    for _ in range(len(entries)):
        if all(trainer.replay._scored_at.get((prompt, e.tokens), 0) > trained for e in entries):
            break
        trainer.collect()  # no training in between: every rescore sees the same policy
    expected = completion_log_probs(trainer.parts.policy, trainer.tokenizer, trainer.task, prompt_index,
                                    [list(e.tokens) for e in entries])
    recorded = torch.tensor([trainer.replay._log_pf[(prompt, e.tokens)] for e in entries], dtype=torch.float64)
    assert torch.allclose(recorded, expected, atol=1e-5)
    probs = trainer.replay.probabilities(prompt, lambda s: s / trainer.cfg.objective.beta)
    deficit = torch.tensor([e.score for e in entries], dtype=torch.float64) / trainer.cfg.objective.beta - expected
    assert int(probs.argmax()) == int(deficit.argmax())  # the most under-sampled entry comes first


@pytest.mark.slow
def test_replay_rescore_sets_how_many_stale_entries_a_draw_rescores(tmp_path):
    trainer, _ = _seeded_trainer(tmp_path, "enumerate", ["exploration.replay.priority=ratio",
                                                          "trainer.samples_per_prompt=8"])
    trainer.step()
    for rescore, expected in ((0.25, 2), (0.0, 0)):  # read at every draw: set here between draws
        trainer.cfg.exploration.replay.rescore = rescore
        before = trainer.replay._clock
        batch = trainer.collect()
        prompt = trainer.task.prompts[batch.prompt_indices[0]]
        fresh = [trainer.replay._scored_at.get((prompt, e.tokens), 0) > before
                 for e in trainer.replay.entries(prompt)]
        assert sum(fresh) == expected, rescore
        assert ("time/replay_rescore" in batch.timings) == (expected > 0)


@pytest.mark.slow
def test_seed_none_starts_empty_and_a_space_too_large_to_enumerate(tmp_path):
    trainer, _ = _seeded_trainer(tmp_path / "none", "none")
    assert len(trainer.replay) == 0
    trainer, _ = _seeded_trainer(tmp_path / "auto", "auto", ["task.evaluation.exact_limit=10"])  # 39 > 10
    assert len(trainer.replay) == 0
    with pytest.raises(ConfigError, match=r"exploration.replay.seed=enumerate.*exact_limit=10"):
        _seeded_trainer(tmp_path / "enumerate", "enumerate", ["task.evaluation.exact_limit=10"])
