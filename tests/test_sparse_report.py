"""gf_odg.bench.sparse_report (scripts/sparse_report.py is its shim) on a fabricated run dir: no model, no W&B."""

from __future__ import annotations

import json
import math
import os

from gf_odg.bench import sparse_report


def _table(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"columns": ["step", "prompt", "completion", "score", "replayed"], "data": rows}))


def fake_run(tmp_path, max_steps=3):
    run = tmp_path / "run"
    tables = run / "wandb" / "offline-run-1" / "files" / "media" / "table"
    p, v = "Pick a random integer", -4.615
    _table(tables / "samples_1_aa.table.json", [[1, p, "To find", None, False], [1, p, "42", v, False]])
    _table(tables / "samples_2_bb.table.json", [[2, p, "42\n", v, False], [2, p, " 7", v, False],
                                                [2, p, "99", v, True]])  # replayed: not a find
    _table(tables / "samples_3_cc.table.json", [[3, p, "7", v, False], [3, p, "13", -10.0, False]])
    _table(tables / "eval_after" / "samples_3_dd.table.json", [[p, "55", v, "55", "policy"]])  # not training
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        f"seed: 1\nexploration:\n  name: default\n  replay:\n    enabled: false\n"
        f"trainer:\n  max_steps: {max_steps}\n  samples_per_prompt: 2\n  sample_table_every: 1\n")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "eval_before/valid_fraction": 0.05},
        {"step": 1, "time/step": 2.0, "reward/valid_fraction": 0.5, "log_z": -1.0},
        {"step": 2, "time/step": 3.0, "reward/valid_fraction": 1.0, "log_z": -2.0},
        {"step": 3, "time/step": 1.0, "reward/valid_fraction": 1.0, "log_z": -3.0}]) + "\n")
    (run / "eval.json").write_text(json.dumps({
        "before": {"valid_fraction": 0.05, "distinct": 3, "n_samples": 512},
        "after": {"valid_fraction": 0.9, "distinct": 40, "score_mean": -4.6, "n_samples": 512}}))
    os.utime(run / ".hydra" / "config.yaml", (1000, 1000))
    os.utime(run / "eval.json", (1090, 1090))
    return run


def test_counts_distinct_valid_fresh_completions(tmp_path):
    s = sparse_report.run_summary(fake_run(tmp_path), milestones=(1, 2, 5))
    t = s["training"]
    assert t["logged_steps"] == 3 and t["fresh_samples"] == 6
    assert t["high_samples"] == 5  # the violation is out, the replayed "99" is not a find
    assert t["found"] == ["13", "42", "7"] and t["distinct_high"] == 3  # "42\n" is "42", " 7" is "7"
    assert t["first_step_reaching"] == {1: 1, 2: 2, 5: None}
    assert t["curve"] == [(1, 1), (2, 2), (3, 3)]
    assert s["after"]["distinct"] == 40 and s["before"]["valid_fraction"] == 0.05
    assert s["train_time_s"] == 6.0 and s["final_log_z"] == -3.0 and s["run_wall_s"] == 90
    assert s["exploration"] == "default" and s["seed"] == 1 and s["training_counts_complete"]


def test_threshold_exact_key_and_partial_logging(tmp_path):
    run = fake_run(tmp_path, max_steps=10)
    t = sparse_report.run_summary(run, threshold=-5.0, key="exact")["training"]
    assert t["found"] == [" 7", "42", "42\n", "7"]  # -10.0 is below the threshold
    out = sparse_report.markdown([sparse_report.run_summary(run)])
    assert "| run | default | 1 | 10 |" in out and "Not every step's batch was logged" in out and "1 min 30 s" in out


def test_cli_writes_json(tmp_path, capsys):
    run = fake_run(tmp_path)
    assert sparse_report.main([str(run), "--json", str(tmp_path / "r.json"), "--milestones", "1,2"]) == 0
    written = json.loads((tmp_path / "r.json").read_text())
    expected = sparse_report.run_summary(run, milestones=(1, 2))
    assert written == [json.loads(json.dumps(expected, default=str))]  # every figure, as run_summary gives it
    out = capsys.readouterr().out
    assert "| run | default | 1 | 3 | 0.833 (5/6) | 3 | 1 / 2 | 0.900 | 40 | - | 1 min 30 s |" in out, out
    assert "Base model (the runs' `eval_before`): valid 0.050, distinct 3 over 512 samples." in out
    assert "Not every step's batch" not in out
    assert sparse_report.main([str(tmp_path / "nope")]) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_without_tables_counts_nothing(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    t = sparse_report.run_summary(run)["training"]
    assert (t["fresh_samples"], t["high_samples"], t["distinct_high"]) == (0, 0, 0) and math.isnan(t["high_fraction"])
