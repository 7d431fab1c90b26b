"""prefill: one training step's sampling and scoring (forward + backward) of K completions of one
prompt, with the prompt computed once and its KV cache shared, against per-sample prefill (what
`generate(num_return_sequences=K)` and a plain teacher-forced pass do); on the rng chat prompt and
on a few-shot prompt of >= 200 tokens. Figures: speed-up = per-sample seconds / shared seconds."""

from __future__ import annotations

from pathlib import Path

import torch

from gf_odg.bench.common import Context, load, long_prompt, timed


def run(ctx: Context) -> list[dict]:
    from gf_odg.data.constraints import ConstraintSet
    from gf_odg.data.prompts import PromptBatch, render_prompt
    from gf_odg.generation.sampling import sample
    from gf_odg.generation.scoring import score_completions

    device = ctx.device
    cfg, model, tok = load(ctx)
    cons = ConstraintSet.from_config({"allowed": "digits", "min_new_tokens": 1}, tok, 4)
    prompts = {
        "rng (chat prompt)": render_prompt(tok, cfg.task.prompts[0], True, None),
        "few-shot (long prompt)": render_prompt(tok, long_prompt(tok), False, None),
    }
    rows = []
    for name, ids in prompts.items():
        batch = PromptBatch.build([ids], [name], tok.pad_token_id, device)
        for k in ctx.ks:
            group = torch.zeros(k, dtype=torch.long, device=device)
            traj = sample(model, tok, batch, group, cons, generator=torch.Generator(device=device).manual_seed(0))
            row = {"prompt": name, "prompt_tokens": len(ids), "K": k}
            for share in (True, False):
                def do_sample(share=share):
                    sample(model, tok, batch, group, cons, generator=torch.Generator(device=device).manual_seed(0),
                           share_prefill=share)

                def do_score(share=share):
                    model.zero_grad(set_to_none=True)
                    lp = score_completions(model, batch, group, traj.tokens, traj.lengths, cons, tok.eos_token_id,
                                           share_prefill=share)
                    lp.total().sum().backward()

                tag = "shared" if share else "per_sample"
                row[f"sample_s_{tag}"] = timed(do_sample, device, ctx.repeats)
                row[f"score_s_{tag}"] = timed(do_score, device, ctx.repeats)
            row.update(speedups(row))
            rows.append(row)
            print(f"  prefill {name} K={k}: step x{row['speedup_step']:.1f} "
                  f"(sample x{row['speedup_sample']:.1f}, score x{row['speedup_score']:.1f})", flush=True)
    return rows


def speedups(row: dict) -> dict:
    """Per-sample seconds over shared seconds: sampling, scoring, and the two together."""
    return {"speedup_sample": row["sample_s_per_sample"] / row["sample_s_shared"],
            "speedup_score": row["score_s_per_sample"] / row["score_s_shared"],
            "speedup_step": ((row["sample_s_per_sample"] + row["score_s_per_sample"])
                             / (row["sample_s_shared"] + row["score_s_shared"]))}


def markdown(rows: list[dict]) -> list[str]:
    lines = ["| prompt | prompt tokens | K | sample shared / per-sample (s) | score+backward shared / "
             "per-sample (s) | step speed-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {r['K']} | {r['sample_s_shared']:.3f} / "
                     f"{r['sample_s_per_sample']:.3f} | {r['score_s_shared']:.3f} / {r['score_s_per_sample']:.3f} |"
                     f" {r['speedup_step']:.1f}x |")
    return [*lines, ""]


def plot(rows: list[dict], out: Path, title: str) -> list[Path]:
    from gf_odg.bench.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["sample_s_per_sample"] + r["score_s_per_sample"] for r in rows], 0.4,
           label="per-sample prefill")
    ax.bar([i + 0.2 for i in x], [r["sample_s_shared"] + r["score_s_shared"] for r in rows], 0.4,
           label="shared prefill")
    ax.set_xticks(list(x), [f"{r['prompt'].split(' ')[0]} K={r['K']}" for r in rows])
    ax.set_ylabel("sample + score/backward (s)")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    path = out / "benchmark.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
