"""SFT throughput: adl packed against unpacked on the same examples, and adl's trainer against trl's
SFTTrainer on the same transformers GPT-2 weights and the same tokenized examples, one process.

    python benchmarks/sft.py --base runs/tiny --steps 30 --rounds 3 --json benchmarks/sft-tiny.json

The starting point is the base run with the chat template's four special tokens added (rows
mean-initialised), saved as an adl run and exported with `adl export hf`: adl fine-tunes the
first, trl's SFTTrainer the second (``GPT2LMHeadModel``), so both start from identical weights.
The examples are the built-in tasks (addition, reverse, sort, count) rendered by adl's template;
trl receives them tokenized (``input_ids`` + ``assistant_masks``), so both train on the same ids
with the same loss mask (assistant tokens and the end marker).

Contenders, alternating in every round: adl unpacked (one example a row, padded to the batch's
longest), trl unpacked (its collator pads the same way), adl packed (several examples a row,
segment mask, positions restarting), trl packed (best-fit decreasing with position ids; on a
CPU its attention is SDPA, which ignores the restart, so its packed examples see each other:
trl warns about this). Every contender: AdamW, the same lr schedule shape, bf16 autocast where
the host has fast bf16 (adl's precision = auto decides; trl gets the same), batch 16 rows, the
same number of steps; the step time is the median over the steps after the first 5 (measured
from the end of one optimizer step to the end of the next: data, forward, backward, update).
Trained tokens are the loss targets; read tokens are every non-padding token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def prepare(base: Path, work: Path):
    """(adl start run, HF folder, template, tokenizer): the base with the template's tokens, both ways."""
    from adl_cli.data.chat import TemplateSection
    from adl_cli.methods.interop import export_hf
    from adl_cli.methods.sft import SFTRecipe, start_tokenizer
    from adl_cli.runs import init_from, load_run, save_run

    run = load_run(base)
    tok, template = start_tokenizer(run.tokenizer, SFTRecipe(template=TemplateSection()))
    cfg = run.config.with_vocab(tok.vocab_size) if tok.vocab_size > run.config.vocab_size else run.config
    model, _ = init_from(base, cfg, new_tokens=(run.tokenizer.vocab_size, tok.vocab_size))
    from adl_cli.models.hf_gpt2 import check_exportable

    try:
        check_exportable(model.config)
    except Exception:  # the main job unties its head and adds U-net skips: a GPT-2 twin of its shape takes its other weights
        from adl_cli.bench.inference import twin_config
        from adl_cli.models.gpt import GPT

        twin = GPT(twin_config(model.config))
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head") and k in twin.state_dict()
                 and twin.state_dict()[k].shape == v.shape}
        twin.load_state_dict(state, strict=False)
        print(f"note: {base} is not GPT-2-shaped; both sides fine-tune a GPT-2 twin of its shape holding its weights "
              f"but the untied head and the U-net skip weights ({len(state)} of {len(twin.state_dict())} tensors)")
        model = twin
    start = work / "start"
    start.mkdir(parents=True)
    save_run(start, model, tok)
    export_hf(start, work / "hf")
    return start, work / "hf", template, tok


def examples(template, n_per_task: int, seed: int = 0):
    from adl_cli.data.tasks import make_task, split_problems

    convs = []
    for name in ("addition", "reverse", "sort", "count"):
        convs += [p.messages() for p in split_problems(make_task(name), n_per_task, held_out=False, seed=seed)]
    return convs, template.render_many(convs)


def adl_steps(start: Path, work: Path, tasks_n: int, steps: int, batch: int, pack: bool, tag: str) -> tuple[list[float], dict]:
    """Per-step seconds of `adl sft` (the real trainer) and its token counts."""
    from adl_cli.methods.sft import load_sft_recipe, run_sft

    recipe = work / f"adl-{tag}.toml"
    recipe.write_text(f"""
name = "bench"
[init]
from = "{start.as_posix()}"
[data]
tasks = ["addition", "reverse", "sort", "count"]
train_examples = {tasks_n}
val_examples = 0
eval_examples = 0
eval_examples_during = 0
pack = {str(pack).lower()}
short_operands = 0.0
[train]
steps = {steps}
batch_size = {batch}
lr = 1e-3
min_lr = 1e-4
warmup = 2
weight_decay = 0.0
optimizer = "adamw"
eval_every = 0
checkpoint_every = 0
log_every = 1
""", encoding="utf-8")
    out = work / f"run-{tag}"
    outcome = run_sft(load_sft_recipe(recipe), out, force=True, progress=False, log=lambda *a, **k: None, evaluate_base=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["train_s"] for r in rows if "train_s" in r]
    per = [b - a for a, b in zip(times, times[1:])]
    s = outcome.summary
    return per, {"trained_per_step": s["trained_tokens"] / s["steps"], "read_per_step": s["tokens_seen"] / s["steps"], "precision": s["precision"]}


def trl_steps(hf: Path, work: Path, rendered, steps: int, batch: int, pack: bool, bf16: bool, tag: str) -> tuple[list[float], dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_dict({"input_ids": [ids for ids, _ in rendered], "assistant_masks": [[int(t) for t in m] for _, m in rendered]})
    tok = AutoTokenizer.from_pretrained(hf)
    model = GPT2LMHeadModel.from_pretrained(hf, dtype=torch.float32)
    ends: list[float] = []
    counts = {"trained": 0, "read": 0}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    cfg = SFTConfig(output_dir=str(work / f"trl-{tag}"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
                    lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.0, logging_steps=10_000, save_strategy="no", report_to=[],
                    bf16=bf16, use_cpu=True, max_length=model.config.n_positions, packing=pack, dataloader_num_workers=0,
                    optim="adamw_torch", seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features):
        out = collate(features)
        counts["trained"] += int((out["labels"] != -100).sum())
        counts["read"] += int(out["attention_mask"].sum()) if "attention_mask" in out else int(out["input_ids"].numel())
        return out

    trainer.data_collator = counting
    trainer.train()
    per = [b - a for a, b in zip(ends, ends[1:])]
    return per, {"trained_per_step": counts["trained"] / steps, "read_per_step": counts["read"] / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--examples", type=int, default=2000, help="training problems per task")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from adl_cli.engine.runtime import resolve_precision

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start, hf, template, tok = prepare(args.base, work)
        convs, rendered = examples(template, args.examples)
        bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
        contenders = [("adl unpacked", "adl", False), ("trl unpacked", "trl", False), ("adl packed", "adl", True), ("trl packed", "trl", True)]
        if args.no_trl:
            contenders = [c for c in contenders if c[1] == "adl"]
        results = {name: {"step_s": [], "info": None, "error": None} for name, _, _ in contenders}
        for rnd in range(args.rounds):
            for name, who, pack in (contenders if rnd % 2 == 0 else contenders[::-1]):
                tag = f"{who}-{'p' if pack else 'u'}-{rnd}"
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state(True)  # each contender sets up its own accelerator (trl's asks for bf16)
                try:
                    if who == "adl":
                        per, info = adl_steps(start, work, args.examples, args.steps, args.batch, pack, tag)
                    else:
                        per, info = trl_steps(hf, work, rendered, args.steps, args.batch, pack, bf16, tag)
                except Exception as e:  # a peer that does not run here is reported, not hidden
                    results[name]["error"] = f"{type(e).__name__}: {e}"[:300]
                    continue
                results[name]["step_s"].append(statistics.median(per[5:]))
                results[name]["info"] = info
                print(f"round {rnd} {name}: {results[name]['step_s'][-1] * 1e3:.1f} ms/step", flush=True)
    table = {}
    for name, r in results.items():
        if not r["step_s"]:
            table[name] = {"error": r["error"]}
            continue
        step = statistics.median(r["step_s"])
        info = r["info"]
        table[name] = {"step_ms": step * 1e3, "trained_tokens_per_s": info["trained_per_step"] / step,
                       "read_tokens_per_s": info["read_per_step"] / step, "trained_per_step": info["trained_per_step"],
                       "read_per_step": info["read_per_step"], "rounds_ms": [s * 1e3 for s in r["step_s"]]}
    print(f"\n{'contender':<14} {'ms/step':>8} {'trained tok/s':>14} {'read tok/s':>11} {'trained/step':>13}")
    for name, t in table.items():
        if "error" in t:
            print(f"{name:<14} not run: {t['error']}")
            continue
        print(f"{name:<14} {t['step_ms']:>8.1f} {t['trained_tokens_per_s']:>14,.0f} {t['read_tokens_per_s']:>11,.0f} {t['trained_per_step']:>13,.0f}")
    ratios = {}
    for a, b in (("adl packed", "adl unpacked"), ("adl unpacked", "trl unpacked"), ("adl packed", "trl packed"), ("adl packed", "trl unpacked")):
        if "step_ms" in table.get(a, {}) and "step_ms" in table.get(b, {}):
            ratios[f"{a} / {b} (trained tok/s)"] = table[a]["trained_tokens_per_s"] / table[b]["trained_tokens_per_s"]
            ratios[f"{b} / {a} (step time)"] = table[b]["step_ms"] / table[a]["step_ms"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"base": str(args.base), "steps": args.steps, "rounds": args.rounds, "batch": args.batch,
                                         "bf16": bf16, "threads": torch.get_num_threads(), "table": table, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
