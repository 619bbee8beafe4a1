"""DPO and GRPO step time: `adl rlhf dpo` against trl's DPOTrainer and `adl rlhf grpo` against trl's
GRPOTrainer, on the same transformers GPT-2 weights, the same tokenizer and the same data.

    python benchmarks/rlhf.py --section dpo --base runs/addition --steps 40 --rounds 2 --json benchmarks/rlhf-tiny.json
    python benchmarks/rlhf.py --section grpo --base runs/sft-tiny --steps 20 --rounds 2 --json benchmarks/rlhf-grpo-tiny.json

The SFT run (a chat run) is saved as a GPT-2-shaped adl run and exported with `adl export hf`
(benchmarks/sft.py's `prepare`): adl trains the first, trl the second (GPT2LMHeadModel and the
exported fast tokenizer with the chat template as Jinja), so both start from identical weights and
read identical ids. The pairs are the built-in arithmetic and format sets, given to trl in its
conversational shape (prompt messages, chosen and rejected assistant messages), which its chat
template renders exactly as adl's template does.

Contenders, alternating (the order reversed every other round), each a fresh run: adl (reference log-probs cached once,
no per-step KL), adl with its per-step KL on (one more reference forward a step), trl as it comes
(a second, frozen model gives the reference log-probs every step) and trl with
precompute_ref_log_probs (once, up front). All: full DPO (sigmoid loss, beta 0.1), AdamW, constant
lr, no dropout, batch 16 pairs, bf16 autocast where the host has fast bf16 (adl's precision = auto
decides; trl gets the same) and fp32. Step time: the median over every run's steps after the
first 5 (adl: end of one optimizer step to the end of the next, from metrics.jsonl; trl: the
same from a callback). Reference precomputation is outside the steps for both.

GRPO (``--section grpo``): 8 problems of the reverse task x 8 sampled answers a step (temperature 1,
at most 12 new tokens, stopping at the template's end), rewards from the task's verifier (correct +
0.2 x format), group-scaled advantages, DAPO loss, clip [0.8, 1.28], no KL term (trl's default
beta = 0: no reference model on either side), one update per batch, constant lr 1e-5. Both sample
with their own engines (adl: its batched KV-cache decoder; trl: transformers' generate) and time
whole steps (rollouts, scoring, the update). adl also reports where its step goes: rollout tokens/s
(sampled tokens over rollout seconds) and updates/s (the rest of the step). Completion lengths
differ between the two samplers' draws, so the table gives ms per step and ms per 1,000 sampled
tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH = 16
BETA = 0.1
LR = 5e-5


def pairs(n: int):
    from adl_cli.data.preferences import make_pairs

    return make_pairs("arithmetic", n // 2, held_out=False, seed=0) + make_pairs("format", n - n // 2, held_out=False, seed=0)


def adl_steps(start: Path, work: Path, n: int, steps: int, precision: str, step_kl: bool, tag: str) -> list[float]:
    """Per-step seconds of `adl rlhf dpo` (the real method) from ``start``."""
    from adl_cli.methods.rlhf.dpo import load_dpo_recipe, run_dpo

    recipe = work / f"adl-{tag}.toml"
    recipe.write_text(f"""
name = "bench"
[init]
from = "{start.as_posix()}"
[data]
sets = ["arithmetic", "format"]
train_pairs = {n // 2}
val_pairs = 0
[dpo]
beta = {BETA}
step_kl = {str(step_kl).lower()}
kl_prompts = 0
match_prompts = 0
[train]
steps = {steps}
batch_size = {BATCH}
lr = {LR}
min_lr = {LR}
schedule = "constant"
warmup = 0
weight_decay = 0.0
beta2 = 0.999
precision = "{precision}"
eval_every = 0
checkpoint_every = 0
log_every = 1
""", encoding="utf-8")
    out = work / f"run-{tag}"
    run_dpo(load_dpo_recipe(recipe), out, force=True, progress=False, log=lambda *a, **k: None, evaluate_base=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["train_s"] for r in rows if "train_s" in r]
    return [b - a for a, b in zip(times, times[1:])]


def trl_steps(hf: Path, work: Path, data, steps: int, bf16: bool, precompute: bool, tag: str) -> list[float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in data])
    tok = AutoTokenizer.from_pretrained(hf)
    model = GPT2LMHeadModel.from_pretrained(hf, dtype=torch.float32)
    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    cfg = DPOConfig(output_dir=str(work / f"trl-{tag}"), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=BETA, loss_type=["sigmoid"], logging_steps=10_000,
                    save_strategy="no", report_to=[], bf16=bf16, use_cpu=True, dataloader_num_workers=0, precompute_ref_log_probs=precompute,
                    disable_dropout=True, optim="adamw_torch", seed=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])]


GROUP = 8
PROBLEMS = 8
NEW_TOKENS = 12
GRPO_LR = 1e-5


def adl_grpo_steps(start: Path, work: Path, steps: int, precision: str, tag: str) -> dict:
    """Per-step seconds, sampled tokens and rollout seconds of `adl rlhf grpo` from ``start``."""
    from adl_cli.methods.rlhf.grpo import load_grpo_recipe, run_grpo

    recipe = work / f"adl-grpo-{tag}.toml"
    recipe.write_text(f"""
name = "bench"
[init]
from = "{start.as_posix()}"
[data]
tasks = ["reverse"]
eval_examples = 0
[grpo]
group = {GROUP}
max_new_tokens = {NEW_TOKENS}
temperature = 1.0
loss_type = "dapo"
eps_low = 0.2
eps_high = 0.28
eval_prompts = 0
[train]
steps = {steps}
batch_size = {PROBLEMS}
lr = {GRPO_LR}
min_lr = {GRPO_LR}
schedule = "constant"
warmup = 0
weight_decay = 0.0
beta2 = 0.999
precision = "{precision}"
eval_every = 0
checkpoint_every = 0
log_every = 1
""", encoding="utf-8")
    out = work / f"run-grpo-{tag}"
    run_grpo(load_grpo_recipe(recipe), out, force=True, progress=False, log=lambda *a, **k: None, evaluate_base=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train_s" in r]
    times = [r["train_s"] for r in rows]
    return {"step_s": [b - a for a, b in zip(times, times[1:])], "tokens": [r["length"] * PROBLEMS * GROUP for r in rows[1:]],
            "rollout_s": [r["rollout_s"] for r in rows[1:]]}


def trl_grpo_steps(hf: Path, work: Path, steps: int, bf16: bool, tag: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from adl_cli.data.tasks import make_task, split_problems

    task = make_task("reverse")
    problems = split_problems(task, PROBLEMS * (steps + 2), held_out=False, seed=0, stream="bench")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}], "final": p.final} for p in problems])
    tok = AutoTokenizer.from_pretrained(hf)
    model = GPT2LMHeadModel.from_pretrained(hf, dtype=torch.float32)
    end = tok.convert_tokens_to_ids("<|end|>")
    ends: list[float] = []
    lengths: list[float] = []

    def reward(completions, final, **kw):
        from adl_cli.data.tasks import Problem

        out = []
        for c, f in zip(completions, final):
            text = c[0]["content"] if isinstance(c, list) else c
            out.append(float(task.verify(text, Problem("reverse", "", f, f))) + 0.2 * float(task.follows_format(text)))
        return out

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    cfg = GRPOConfig(output_dir=str(work / f"trl-grpo-{tag}"), max_steps=steps, per_device_train_batch_size=PROBLEMS * GROUP, num_generations=GROUP,
                     max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
                     scale_rewards="group", num_iterations=1, learning_rate=GRPO_LR, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], bf16=bf16, use_cpu=True, dataloader_num_workers=0,
                     disable_dropout=True, optim="adamw_torch", seed=0, disable_tqdm=True, generation_kwargs={"eos_token_id": end})
    trainer = GRPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, reward_funcs=reward, callbacks=[Timer()])
    trainer.train()
    return {"step_s": [b - a for a, b in zip(ends, ends[1:])], "tokens": [x * PROBLEMS * GROUP for x in lengths[1:]]}


def grpo_section(base: Path, work: Path, steps: int, rounds: int) -> dict:
    from accelerate.state import AcceleratorState

    from adl_cli.engine.runtime import resolve_precision
    from sft import prepare

    auto = resolve_precision("auto", torch.device("cpu"))
    start, hf, _, _ = prepare(base, work)
    results = {}
    for label in ["fp32"] + ([auto] if auto != "fp32" else []):
        got: dict[str, dict[str, list[float]]] = {"adl": {"step_s": [], "tokens": [], "rollout_s": []}, "trl": {"step_s": [], "tokens": []}}
        for r in range(rounds):
            for name in (["adl", "trl"] if r % 2 == 0 else ["trl", "adl"]):
                AcceleratorState._reset_state(True)
                tag = f"{label}-{name}-{r}"
                t = adl_grpo_steps(start, work, steps, label, tag) if name == "adl" else trl_grpo_steps(hf, work, steps, label != "fp32", tag)
                for k in got[name]:
                    got[name][k] += t[k][3:]
                print(f"[grpo {label}] round {r + 1} {name}: median {statistics.median(t['step_s'][3:]) * 1e3:.1f} ms/step, "
                      f"{statistics.mean(t['tokens'][3:]):.0f} sampled tokens a step", flush=True)
        med = {k: statistics.median(v["step_s"]) for k, v in got.items()}
        per_k = {k: 1e3 * sum(v["step_s"]) / sum(v["tokens"]) * 1e3 for k, v in got.items()}  # ms per 1,000 sampled tokens
        a = got["adl"]
        roll = sum(a["rollout_s"])
        results[label] = {"ms_per_step": {k: v * 1e3 for k, v in med.items()}, "trl_over_adl_step": med["trl"] / med["adl"],
                          "ms_per_1k_tokens": per_k, "trl_over_adl_per_token": per_k["trl"] / per_k["adl"],
                          "tokens_per_step": {k: statistics.mean(v["tokens"]) for k, v in got.items()},
                          "adl_rollout_tokens_per_s": sum(a["tokens"]) / roll, "adl_rollout_share": roll / sum(a["step_s"]),
                          "adl_updates_per_s": len(a["step_s"]) / (sum(a["step_s"]) - roll), "steps_timed": {k: len(v["step_s"]) for k, v in got.items()}}
        x = results[label]
        print(f"[grpo {label}] adl {med['adl'] * 1e3:.1f} ms/step ({x['tokens_per_step']['adl']:.0f} tokens), trl {med['trl'] * 1e3:.1f} "
              f"({x['tokens_per_step']['trl']:.0f} tokens): {x['trl_over_adl_step']:.2f}x a step, {x['trl_over_adl_per_token']:.2f}x per sampled token; "
              f"adl rollouts {x['adl_rollout_tokens_per_s']:.0f} tokens/s ({x['adl_rollout_share']:.0%} of the step), "
              f"{x['adl_updates_per_s']:.1f} updates/s", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", choices=("dpo", "grpo"), default="dpo")
    ap.add_argument("--base", type=Path, default=None, help="the SFT (chat) run whose weights both sides train (dpo: runs/addition, grpo: runs/sft-tiny)")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40, help="steps per run (the first 5 are warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each contender, alternating")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import platform

    import trl

    from adl_cli.engine.runtime import resolve_precision
    from sft import prepare

    if args.section == "grpo":
        base = args.base or Path("runs/sft-tiny")
        with tempfile.TemporaryDirectory() as tmp:
            res = grpo_section(base, Path(tmp), args.steps, args.rounds)
        out = {"host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "trl": trl.__version__, "base": str(base), "problems": PROBLEMS, "group": GROUP, "max_new_tokens": NEW_TOKENS,
               "steps": args.steps, "rounds": args.rounds, "grpo": res}
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
            print(f"wrote {args.json}")
        return
    args.base = args.base or Path("runs/addition")
    auto = resolve_precision("auto", torch.device("cpu"))
    data = pairs(args.pairs)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start, hf, _, _ = prepare(args.base, work)
        for label in ["fp32"] + ([auto] if auto != "fp32" else []):
            times: dict[str, list[float]] = {"adl": [], "adl_step_kl": [], "trl": [], "trl_precomputed": []}
            for r in range(args.rounds):
                for name in (list(times) if r % 2 == 0 else list(times)[::-1]):
                    from accelerate.state import AcceleratorState

                    AcceleratorState._reset_state(True)  # each contender sets up its own accelerator (trl's asks for bf16)
                    tag = f"{label}-{name}-{r}"
                    if name.startswith("adl"):
                        t = adl_steps(start, work, args.pairs, args.steps, label, name == "adl_step_kl", tag)
                    else:
                        t = trl_steps(hf, work, data, args.steps, label != "fp32", name == "trl_precomputed", tag)
                    times[name] += t[5:]
                    print(f"[{label}] round {r + 1} {name}: median {statistics.median(t[5:]) * 1e3:.1f} ms/step", flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            results[label] = {"ms_per_step": {k: v * 1e3 for k, v in med.items()},
                              "over_adl": {k: v / med["adl"] for k, v in med.items()}, "steps_timed": {k: len(v) for k, v in times.items()}}
            print(f"[{label}] adl {med['adl'] * 1e3:.1f} ms/step (per-step KL on: {med['adl_step_kl'] * 1e3:.1f}); "
                  f"trl {med['trl'] * 1e3:.1f} ({med['trl'] / med['adl']:.2f}x adl's); trl with precomputed reference "
                  f"{med['trl_precomputed'] * 1e3:.1f} ({med['trl_precomputed'] / med['adl']:.2f}x)", flush=True)
    out = {"host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "trl": trl.__version__, "base": str(args.base), "pairs": args.pairs, "batch": BATCH, "steps": args.steps, "rounds": args.rounds,
           "dpo": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
