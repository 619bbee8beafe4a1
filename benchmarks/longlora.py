"""LongLoRA against full fine-tuning with full attention, extending a RoPE run to 4x its context.

    python benchmarks/longlora.py --base runs/tiny-rope-long --json benchmarks/longlora-tiny.json

The base is recipes/pretrain/tiny-rope-long.toml (RoPE, trained at 512 bytes of Python source).
Every contender is tuned through `adl lora`'s engine from recipes/lora/longlora.toml with the same
data (windows of 2,048 bytes of the base's training side), steps, batch and YaRN scaling (s = 4):

- ``full``: every weight, full attention (the reference the issue names: "full-attention full
  fine-tuning at equal steps"), lr --full-lr;
- ``longlora``: S2-Attn in groups of 512 while training, LoRA r 8 on q, k, v and the attention's
  output, the embeddings and norms in full (train.lr), adapters at adapter_lr;
- ``lora``: the same adapters with full attention (what S2-Attn changes, alone).

Read with full attention at 512, 1,024 and 2,048 tokens: perplexity on the same held-out bytes
at every length (bench/context.perplexity), and passkey retrieval (--passkey trials per length).
The zero-shot base with YaRN (s = 4) and with plain RoPE is the starting point. Step time:
every contender's training model takes --time-steps steps per round on one batch, alternating,
--rounds rounds, median; peak tensor memory of one training step as `adl lora` measures it.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

CONTENDERS = ("full", "longlora", "lora")


def _sets(name: str, args) -> list[str]:
    common = [f"init.from={args.base.as_posix()}", f"train.steps={args.steps}", "train.checkpoint_every=0"]
    if name == "full":
        return common + ["method=full", "context.s2_group=0", f"train.lr={args.full_lr}", f"train.min_lr={args.full_lr / 10}"]
    if name == "lora":
        return common + ["method=lora", "context.s2_group=0", 'lora.modules_to_save=["wte","ln_1","ln_2","ln_f"]']
    return common


def main() -> None:
    from adl_cli.bench.context import perplexity
    from adl_cli.bench.passkey import passkey_accuracy
    from adl_cli.data.tokens import load_tokens
    from adl_cli.methods.finetune import load_finetune_recipe, run_finetune
    from adl_cli.methods.pretrain import load_pretrain_recipe
    from adl_cli.nn.position import swapped_position
    from adl_cli.runs import load_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/tiny-rope-long"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--full-lr", type=float, default=3e-4)
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of the longest length scored at every length")
    ap.add_argument("--passkey", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--time-steps", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "lora" / "longlora.toml"
    base = load_run(args.base)
    data = load_tokens(load_pretrain_recipe(args.base / "recipe.toml").data, tokenizer=base.tokenizer)
    span = args.windows * max(lengths)
    trained = base.config.block_size

    def measure(model) -> dict:
        out = {}
        for length in lengths:
            loss, _ = perplexity(model, data.val, length, span)
            out[str(length)] = {"ppl": float(torch.tensor(loss).exp()),
                                "passkey": passkey_accuracy(model, base.tokenizer, data.val, length, args.passkey, seed=length)}
        return out

    result = {"host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": {}}
    s = max(lengths) / trained
    for name, opts in (("base, RoPE", None), (f"base, YaRN s={s:g}", {"scale": s, "original_max_position": trained})):
        model = base.model
        if opts is None:
            result["rows"][name] = measure(model)
        else:
            with swapped_position(model, "yarn", **{**({"theta": base.config.position_options["theta"]} if "theta" in base.config.position_options else {}), **opts}):
                result["rows"][name] = measure(model)
        print(f"[{name}] " + ", ".join(f"{k}: ppl {v['ppl']:.3f}, passkey {v['passkey']:.0%}" for k, v in result["rows"][name].items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONTENDERS:
            recipe = load_finetune_recipe(recipe_path, _sets(name, args))
            print(f"[{name}] {args.steps} steps at {recipe.context.length} tokens ...", flush=True)
            outcome = run_finetune(recipe, Path(tmp) / name, force=True, progress=False, log=lambda *a, **k: None, evaluate_base=False)
            run = load_run(Path(tmp) / name)
            rows = measure(run.model)
            sm = outcome.summary
            result["rows"][name] = rows
            result.setdefault("train", {})[name] = {"trainable": sm["trainable_parameters"], "share": sm["trainable_share"],
                                                    "peak_mib": sm["peak_tensor_bytes"] / 2**20, "train_wall_s": sm["train_wall_s"],
                                                    "train_loss": sm["train_loss"]}
            print(f"[{name}] " + ", ".join(f"{k}: ppl {v['ppl']:.3f}, passkey {v['passkey']:.0%}" for k, v in rows.items())
                  + f"; peak {sm['peak_tensor_bytes'] / 2**20:.0f} MiB, {sm['train_wall_s']:.0f} s", flush=True)
    result["step_times"] = step_times(recipe_path, args)
    longest = str(max(lengths))
    ref = result["rows"]["full"][longest]["ppl"]
    print(f"\nat {longest} tokens ({max(lengths) // trained}x the base's context), {args.steps} steps:")
    print("contender            ppl 512   ppl 1024  ppl 2048  x full   passkey@2048  peak MiB  ms/step  x full")
    for name, rows in result["rows"].items():
        t = result.get("train", {}).get(name)
        st = result["step_times"].get(name)
        print(f"{name:20} " + "  ".join(f"{rows[str(L)]['ppl']:8.3f}" for L in lengths) + f"  {rows[longest]['ppl'] / ref:6.3f}   {rows[longest]['passkey']:6.0%}"
              + (f"        {t['peak_mib']:7.0f}  {st['step_ms']:7.0f}  {st['ratio_full']:.2f}" if t else ""))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


def step_times(recipe_path: Path, args) -> dict:
    """Median training-step seconds of each contender's model on one batch, alternating."""
    from adl_cli.data.packing import collate
    from adl_cli.engine import optim
    from adl_cli.engine.runtime import autocast_dtype, resolve_precision
    from adl_cli.methods.finetune import load_finetune_recipe, param_groups, prepare_model, text_dataset
    from adl_cli.methods.sft import load_base

    base = load_base(str(args.base))
    dtype = autocast_dtype(resolve_precision("auto", torch.device("cpu")))
    models = {}
    for name in CONTENDERS:
        recipe = load_finetune_recipe(recipe_path, _sets(name, args) + ["data.val_windows=1"])
        torch.manual_seed(0)
        model = prepare_model(recipe, base, base.tokenizer).model.train()
        data = text_dataset(recipe, base.tokenizer, recipe.context.length)
        batch = collate(data.rows, torch.arange(recipe.train.batch_size))
        opt, _ = optim.make_optimizer("adamw", param_groups(recipe)(model), recipe.train, torch.device("cpu"))
        models[name] = (model, opt, batch)

    def step(name):
        model, opt, batch = models[name]
        with torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.enable_grad():
            loss = model(batch["inputs"], batch["targets"])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from adl_cli.bench.timing import alternating_medians

    med = alternating_medians({n: (lambda n=n: step(n)) for n in CONTENDERS}, rounds=args.rounds, repeats=args.time_steps)
    return {n: {"step_ms": med[n] * 1e3, "ratio_full": med[n] / med["full"]} for n in CONTENDERS}


if __name__ == "__main__":
    main()
