"""Speculative and prompt-lookup decoding on the main job: tokens/s against plain cached greedy
decoding, alternating contenders, medians over rounds, one process.

    python benchmarks/speculative_tiny.py --target runs/tiny --draft runs/tiny-draft

Greedy (temperature 0), batch 1, 2 threads, new tokens capped to fit the context (no slide). For
the draft, the speed predicted from the measured acceptance rate a, lookahead k and cost ratio c
(draft step time / target step time): (1 - a^(k+1)) / ((1 - a)(1 + k c)) (Leviathan et al. 2023),
next to the measured ratio; eager and compiled (torch.compile over static caches: the draft's steps
and the target's verification passes), each against plain decoding of the same mode. Every
contender's text is checked equal to plain greedy's (exactness). Prompts: the opening of a topic
(open-ended), 32 tokens of the held-out split (the prompt adl bench-inference uses), and a prompt
that quotes text the model then repeats (input-grounded: prompt lookup's case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adl_cli.inference.engine import generate_batch
from adl_cli.inference.sampling import SamplingParams
from adl_cli.inference.speculative import speculative_generate
from adl_cli.methods.evaluate import evaluation_tokens
from adl_cli.runs import load_run


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


@torch.no_grad()
def step_time(model, ids: list[int], steps: int = 40, compiled: bool = False) -> float:
    """Seconds per one-token decode step over a cache holding the prompt (eager, or the compiled static step)."""
    from adl_cli.inference.engine import compiled_step

    state = model.setup_cache(1, model.config.block_size)
    model(torch.tensor([ids]), state=state)
    x = torch.tensor([[ids[-1]]])
    if compiled:
        state.make_static()
        fn = compiled_step(model)
        for _ in range(3):
            fn(x, state)
    t = time.perf_counter()
    for _ in range(steps):
        if compiled:
            fn(x, state)
        else:
            model(x, state=state)
        state.truncate(len(ids))
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="runs/tiny")
    ap.add_argument("--draft", default="runs/tiny-draft")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--lookahead", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    target, draft = load_run(Path(args.target)), load_run(Path(args.draft))
    tok = target.tokenizer
    quote = "The \"with\" statement is used to wrap the execution of a block with methods defined by a context manager."
    held_out, _ = evaluation_tokens(target, None, "val")
    prompts = {"open-ended": "The with statement", "held-out (32 tokens)": [int(t) for t in held_out[1000:1032]],
               "input-grounded": f"{quote}\n\n{quote}\n\n{quote[:40]}"}
    greedy = SamplingParams(temperature=0)
    results = []
    for name, text in prompts.items():
        ids = text if isinstance(text, list) else [int(t) for t in tok.encode(text)]
        idx = torch.tensor([ids])
        n_new = min(args.new_tokens, target.model.config.block_size - len(ids))  # within the context: no sliding
        costs = {}
        for compiled in (False, True):
            step_time(draft.model, ids, compiled=compiled)  # warm-up
            costs[compiled] = step_time(draft.model, ids, compiled=compiled) / step_time(target.model, ids, compiled=compiled)

        def plain(compile=False):
            return generate_batch(target.model, idx.tolist(), n_new, greedy, compile=compile)[0].tokens, None

        contenders = {"plain": plain, "plain compiled": lambda: plain(True)}
        for k in args.lookahead:
            contenders[f"draft k={k}"] = lambda k=k: speculative_generate(target.model, idx, n_new, params=greedy,
                                                                          draft=draft.model, lookahead=k)
            contenders[f"draft compiled k={k}"] = lambda k=k: speculative_generate(target.model, idx, n_new, params=greedy,
                                                                                   draft=draft.model, lookahead=k, compile=True)
            contenders[f"lookup k={k}"] = lambda k=k: speculative_generate(target.model, idx, n_new, params=greedy,
                                                                           lookup_ngram=3, lookahead=k)
        for fn in contenders.values():  # warm-up (compiles the graphs)
            fn()
        times = {n: [] for n in contenders}
        outs = {}
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for n in order:
                dt, (out, stats) = timed(contenders[n])
                times[n].append(dt)
                outs[n] = (out if isinstance(out, list) else out[0, len(ids):].tolist(), stats)
        plain_t = statistics.median(times["plain"])
        print(f"\n{name} prompt ({len(ids)} tokens), {n_new} new tokens; draft/target step cost c = {costs[False]:.2f} eager, "
              f"{costs[True]:.2f} compiled; plain compiled {plain_t / statistics.median(times['plain compiled']):.2f}x plain")
        print(f"{'contender':<20} {'tok/s':>8} {'x plain':>8} {'accept':>7} {'tok/pass':>8} {'predicted vs same mode':>22}  same text")
        for n, ts in times.items():
            tokens, stats = outs[n]
            same = tokens == outs["plain"][0]
            med = statistics.median(ts)
            compiled = "compiled" in n
            own_plain = statistics.median(times["plain compiled" if compiled else "plain"])
            row = {"prompt": name, "contender": n, "median_s": med, "tokens_per_s": n_new / med, "ratio": plain_t / med,
                   "ratio_same_mode": own_plain / med, "same_as_plain": same, "c": costs[compiled]}
            pred = ""
            if stats is not None:
                row.update(acceptance=stats.acceptance, tokens_per_pass=stats.tokens_per_forward)
                if n.startswith("draft"):
                    k, a = int(n.split("=")[1]), min(stats.acceptance, 0.999)
                    row["predicted"] = (1 - a ** (k + 1)) / ((1 - a) * (1 + k * costs[compiled]))  # against plain of its mode
                    pred = f"{row['predicted']:.2f} vs {row['ratio_same_mode']:.2f}"
            results.append(row)
            print(f"{n:<20} {row['tokens_per_s']:>8.1f} {row['ratio']:>8.2f} {row.get('acceptance', float('nan')):>7.2f} "
                  f"{row.get('tokens_per_pass', 1.0):>8.2f} {pred:>22}  {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
