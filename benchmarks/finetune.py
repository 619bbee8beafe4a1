"""Fine-tuning methods side by side: full fine-tuning, LoRA, DoRA, QLoRA and bottleneck adapters on
the same base and data, the peak tensor memory at the GPT-2-124M shape, and adl's LoRA against
peft's LoRA on transformers' GPT2LMHeadModel holding the same weights.

    python benchmarks/finetune.py --base runs/tiny --steps 400 --json benchmarks/finetune-tiny.json

Three parts (``--parts``):

- ``methods``: `adl lora`'s engine (``run_finetune``) on recipes/lora/addition.toml from the base
  run (the main job), one run per method with the same data, steps, batch and schedule (each
  method its own peak lr: --full-lr for full fine-tuning, --adapter-lr for the others); held-out
  loss on the same held-out examples, exact match on the same held-out sums, trainable
  parameters. "gap closed" is (base loss - method loss) / (base loss - full fine-tuning loss):
  the share of what full fine-tuning gains that the method gains. Step time: after the runs,
  every method's model takes --time-steps training steps per round on the same batch,
  alternating methods, for --rounds rounds; the median step (forward, backward, optimizer) is
  quoted, and its ratio to full fine-tuning's.
- ``memory``: a randomly initialised GPT-2-124M (12 x 768, vocabulary 50257, tied head),
  one training step on each --mem-batch rows of --mem-seq tokens under the host's autocast; peak
  tensor memory as engine/memory.py measures it (allocator-tracked on CUDA, every operator's
  storages on a CPU; not process RSS): the model's tensors plus the step's peak (activations,
  gradients, optimizer state). Ratios to full fine-tuning with AdamW.
- ``peft``: a GPT-2-shaped twin of the base (its weights but the untied head and skip
  weights) in adl and as transformers' GPT2LMHeadModel; LoRA r 8 on attn.c_proj, mlp.c_fc and
  mlp.c_proj, adl's adapter through adl (peft injected into adl's modules) and peft's through
  ``get_peft_model`` on the transformers model, A copied from adl's, B zero; AdamW on the same
  plain-text windows in fp32: the two loss curves (max difference), then the step time
  alternating the two for --rounds rounds (fp32 and the host's autocast).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("full", "lora", "dora", "qlora", "adapter")


def _autocast(device: torch.device):
    from adl_cli.engine.runtime import autocast_dtype, resolve_precision

    dtype = autocast_dtype(resolve_precision("auto", device))
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else None, dtype


# ----------------------------------------------------------------------------- methods


def method_runs(base: Path, work: Path, args) -> dict:
    from adl_cli.methods.finetune import load_finetune_recipe, run_finetune

    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "lora" / "addition.toml"
    out = {}
    for i, method in enumerate(METHODS):
        lr = args.full_lr if method == "full" else args.adapter_lr
        sets = [f"method={method}", f"init.from={base.as_posix()}", f"train.steps={args.steps}", f"train.lr={lr}", f"train.min_lr={lr / 10}",
                f"data.eval_examples={args.eval}", "data.eval_examples_during=0", "train.eval_every=0", f"train.checkpoint_every={args.steps}"]
        recipe = load_finetune_recipe(recipe_path, sets)
        print(f"[methods] {method}: {args.steps} steps at lr {lr:g} ...", flush=True)
        outcome = run_finetune(recipe, work / method, force=True, progress=False, log=lambda *a, **k: None, evaluate_base=i == 0)
        s = outcome.summary
        out[method] = {"trainable": s["trainable_parameters"], "share": s["trainable_share"], "peak_mib": s["peak_tensor_bytes"] / 2**20,
                       "val_loss": s["val_loss"], "train_wall_s": s["train_wall_s"], "exact": s["tasks"]["addition"]["sft"]["accuracy"],
                       "ci95": s["tasks"]["addition"]["sft"]["ci95"], "n": s["tasks"]["addition"]["sft"]["n"], "lr": lr}
        if i == 0:
            out["base"] = {"val_loss": s["base_val_loss"], "exact": s["tasks"]["addition"]["base"]["accuracy"]}
        print(f"[methods] {method}: held-out loss {s['val_loss']:.3f}, exact match {out[method]['exact']:.1%}, {s['train_wall_s']:.0f} s", flush=True)
    base_loss, full_loss = out["base"]["val_loss"], out["full"]["val_loss"]
    for method in METHODS:
        out[method]["gap_closed"] = (base_loss - out[method]["val_loss"]) / (base_loss - full_loss)
    return out


def method_step_times(base: Path, args) -> dict:
    """Median training-step seconds of every method's model on one batch, alternating methods."""
    from adl_cli.data.packing import collate
    from adl_cli.engine import optim
    from adl_cli.methods.finetune import build_dataset, load_finetune_recipe, param_groups, prepare_model, start_tokenizer
    from adl_cli.methods.sft import load_base

    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "lora" / "addition.toml"
    run = load_base(str(base))
    device = torch.device("cpu")
    ac, _ = _autocast(device)
    models = {}
    for method in METHODS:
        recipe = load_finetune_recipe(recipe_path, [f"method={method}", f"init.from={base.as_posix()}", "data.train_examples=2000"])
        tok, template = start_tokenizer(run.tokenizer, recipe)
        data = build_dataset(recipe, tok, template, run.config.block_size)
        batch = collate(data.rows, torch.arange(recipe.train.batch_size))
        torch.manual_seed(0)
        model = prepare_model(recipe, run, tok).model.train()
        opt, _ = optim.make_optimizer("adamw", param_groups(recipe)(model), recipe.train, device)
        models[method] = (model, opt, batch)

    def step(method):
        model, opt, batch = models[method]
        with ac() if ac else torch.enable_grad():
            loss = model(batch["inputs"], batch["targets"], segment_ids=batch.get("segments"))[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from adl_cli.bench.timing import alternating_medians

    med = alternating_medians({m: (lambda m=m: step(m)) for m in METHODS}, rounds=args.rounds, repeats=args.time_steps)
    return {m: {"step_ms": med[m] * 1e3, "ratio_full": med[m] / med["full"]} for m in METHODS}


# ----------------------------------------------------------------------------- memory at 124M


def memory_124m(args) -> dict:
    """The memory table at each batch of --mem-batch (comma-separated rows of --mem-seq tokens)."""
    return {f"{b}x{args.mem_seq}": memory_at(args, b) for b in (int(v) for v in str(args.mem_batch).split(","))}


def memory_at(args, rows: int) -> dict:
    from adl_cli.adapters.lora import LoraSection, add_lora
    from adl_cli.adapters.qlora import QloraSection, quantize
    from adl_cli.engine import optim
    from adl_cli.engine.memory import step_memory
    from adl_cli.engine.trainer import TrainConfig
    from adl_cli.models.gpt import GPT, GPTConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ac, dtype = _autocast(device)
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    x = torch.randint(0, 50257, (rows, args.mem_seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1].to(device), x[:, 1:].to(device)
    section = LoraSection(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "c_proj", "c_fc"])
    contenders = {
        "full (AdamW)": dict(adapter=None, opt="adamw", ckpt=False),
        "full (8-bit AdamW)": dict(adapter=None, opt="adamw8bit", ckpt=False),
        "LoRA r16": dict(adapter="lora", opt="adamw", ckpt=False),
        "LoRA r16 + checkpointing": dict(adapter="lora", opt="adamw", ckpt=True),
        "QLoRA r16": dict(adapter="qlora", opt="adamw", ckpt=False),
        "QLoRA r16 + 8-bit AdamW + checkpointing": dict(adapter="qlora", opt="adamw8bit", ckpt=True),
    }
    out = {}
    for name, c in contenders.items():
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        if c["adapter"] == "qlora":
            model = quantize(model, QloraSection())
        if c["adapter"]:
            model = add_lora(model, section)
        model.activation_checkpointing = c["ckpt"]
        model.train()
        tc = TrainConfig(lr=1e-4, weight_decay=0.0, optimizer=c["opt"], fused_adamw=False)
        opt, _ = optim.make_optimizer(c["opt"], optim.param_groups(model, 0.0), tc, device)

        def step():
            with ac() if ac else torch.enable_grad():
                loss = model(inputs, targets)[1]
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        mem = step_memory(model, step, device)
        wall = time.perf_counter() - t0
        out[name] = {"model_mib": mem["model"] / 2**20, "step_mib": mem["step"] / 2**20, "peak_mib": mem["peak"] / 2**20, "step_s": wall}
        print(f"[memory] {rows}x{args.mem_seq} {name}: peak {mem['peak'] / 2**20:,.0f} MiB (model {mem['model'] / 2**20:,.0f}, step {mem['step'] / 2**20:,.0f}), {wall:.1f} s", flush=True)
        del model, opt
    full = out["full (AdamW)"]["peak_mib"]
    for v in out.values():
        v["ratio_full"] = v["peak_mib"] / full
    return {"shape": "GPT-2 124M (12 x 768, vocab 50257)", "batch": [rows, args.mem_seq], "autocast": str(dtype), "rows": out}


# ----------------------------------------------------------------------------- adl vs peft on transformers


def peft_parity(base: Path, args) -> dict:
    from peft import LoraConfig, get_peft_model

    from adl_cli.adapters.lora import LoraSection, add_lora
    from adl_cli.bench.inference import transformers_model, twin_config
    from adl_cli.data.corpus import load_documents, split_documents
    from adl_cli.models.gpt import GPT
    from adl_cli.runs import load_run

    run = load_run(base)
    torch.manual_seed(0)
    twin = GPT(twin_config(run.config))
    state = {k: v for k, v in run.model.state_dict().items() if k in twin.state_dict() and twin.state_dict()[k].shape == v.shape and not k.startswith("lm_head")}
    twin.load_state_dict(state, strict=False)
    hf = transformers_model(twin).train()
    adl = add_lora(twin, LoraSection(r=8, alpha=16, targets=["c_fc", "c_proj"])).train()
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=["c_fc", "mlp.c_proj", "attn.c_proj"], fan_in_fan_out=True,
                                               lora_dropout=0.0, bias="none"))
    with torch.no_grad():  # the same A (B is zero on both sides)
        adl_params = dict(adl.named_parameters())
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                key = name.replace("base_model.model.", "")  # both sides name the adapter "default"
                p.copy_(adl_params[key])
    n_adl = sum(p.numel() for p in adl.parameters() if p.requires_grad)
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # plain-text windows of the base's held-out corpus side
    block = run.config.block_size
    docs = split_documents(load_documents("pydoc"), 0.1)[1]
    ids = []
    for d in docs:
        ids += run.tokenizer.encode(d).tolist() + [run.tokenizer.eot_id]
    B = 8
    n_windows = (len(ids) - 1) // block
    w = torch.tensor(ids[: n_windows * block + 1])
    xs = torch.stack([w[i * block:(i + 1) * block] for i in range(n_windows)])
    ys = torch.stack([w[i * block + 1:(i + 1) * block + 1] for i in range(n_windows)])

    def batch(i):
        idx = torch.arange(i * B, i * B + B) % n_windows
        return xs[idx], ys[idx]

    def adl_loss(x, y):
        return adl(x, y)[1]

    def peft_loss(x, y):
        logits = peft_model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    opt_a = torch.optim.AdamW([p for p in adl.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    opt_p = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    curves = {"adl": [], "peft": []}
    for i in range(args.parity_steps):
        x, y = batch(i)
        for name, loss_fn, opt in (("adl", adl_loss, opt_a), ("peft", peft_loss, opt_p)):
            loss = loss_fn(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curves[name].append(loss.item())
    diff = max(abs(a - b) for a, b in zip(curves["adl"], curves["peft"]))
    print(f"[peft] loss curves over {args.parity_steps} steps: adl {curves['adl'][0]:.4f} -> {curves['adl'][-1]:.4f}, "
          f"peft {curves['peft'][0]:.4f} -> {curves['peft'][-1]:.4f}, max difference {diff:.2e}", flush=True)
    from adl_cli.bench.timing import alternating_medians

    ac, dtype = _autocast(torch.device("cpu"))
    timing = {}
    for label, ctx in (("fp32", None), (str(dtype).replace("torch.", ""), ac)):
        if label != "fp32" and ctx is None:
            continue
        x, y = batch(0)

        def train_step(loss_fn, opt, ctx=ctx):
            with ctx() if ctx else torch.enable_grad():
                loss = loss_fn(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        med = alternating_medians({"adl": lambda: train_step(adl_loss, opt_a), "peft": lambda: train_step(peft_loss, opt_p)},
                                  rounds=args.rounds, repeats=args.time_steps, warmup=args.time_steps)
        timing[label] = {"adl_ms": med["adl"] * 1e3, "peft_ms": med["peft"] * 1e3, "peft_over_adl": med["peft"] / med["adl"]}
        print(f"[peft] {label}: adl {med['adl'] * 1e3:.1f} ms/step, peft on transformers {med['peft'] * 1e3:.1f} ms/step "
              f"(adl {med['peft'] / med['adl']:.2f}x faster)", flush=True)
    return {"shape": f"{run.config.n_layer} x {run.config.n_embd}, block {block}, batch {B}", "trainable": {"adl": n_adl, "peft": n_peft},
            "max_loss_difference": diff, "curves": curves, "timing": timing}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--parts", default="methods,memory,peft")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval", type=int, default=500, help="held-out sums in the exact match")
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--adapter-lr", type=float, default=1e-3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--time-steps", type=int, default=3)
    ap.add_argument("--mem-batch", default="1,4", help="rows per step in the memory part, comma-separated")
    ap.add_argument("--mem-seq", type=int, default=512)
    ap.add_argument("--parity-steps", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    import platform

    result = {"host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args)}
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    with tempfile.TemporaryDirectory() as tmp:
        if "methods" in parts:
            result["methods"] = method_runs(args.base, Path(tmp), args)
            result["method_step_times"] = method_step_times(args.base, args)
            print("\nmethod    trainable        peak MiB  held-out loss  gap closed  exact match        step ms  x full")
            for m in METHODS:
                r, t = result["methods"][m], result["method_step_times"][m]
                print(f"{m:9} {r['trainable']:>9,} ({r['share']:6.2%}) {r['peak_mib']:7.1f}  {r['val_loss']:13.3f}  {r['gap_closed']:9.1%}  "
                      f"{r['exact']:6.1%} ({r['ci95'][0]:.1%}-{r['ci95'][1]:.1%})  {t['step_ms']:6.1f}  {t['ratio_full']:.2f}")
            b = result["methods"]["base"]
            print(f"base      held-out loss {b['val_loss']:.3f}, exact match {b['exact']:.1%}")
        if "memory" in parts:
            result["memory"] = memory_124m(args)
            for batch, table in result["memory"].items():
                print(f"\nGPT-2 124M, one step on {batch} tokens:")
                for name, r in table["rows"].items():
                    print(f"  {name:42} peak {r['peak_mib']:8,.0f} MiB  {r['ratio_full']:.2f}x full")
        if "peft" in parts:
            result["peft"] = peft_parity(args.base, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
