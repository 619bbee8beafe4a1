"""adl generate: sample text from a trained run."""

from __future__ import annotations

from pathlib import Path

import typer


def generate(
    run_dir: Path = typer.Argument(..., help="A run folder written by adl pretrain (or adl import).", show_default=False),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Text to continue (left out: start from <|endoftext|>).", show_default=False),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="A text file of prompts, one a line, decoded in batches.", show_default=False),
    batch: int = typer.Option(8, "--batch", help="Prompts decoded together (left-padded; each row equals its prompt decoded alone)."),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens", "-n", help="How many tokens to sample at most."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Softmax temperature; 0 is greedy."),
    top_k: int = typer.Option(None, "--top-k", help="Sample only among the k most likely tokens.", show_default=False),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling: the smallest set with this much mass.", show_default=False),
    min_p: float = typer.Option(None, "--min-p", help="Min-p sampling: drop tokens less likely than this fraction of the top token's probability.", show_default=False),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Divide (positive) or multiply (negative) the logits of tokens already in the text by this; 1 is off, above 1 discourages repeats."),
    stop: list[str] = typer.Option(None, "--stop", help="End a row when its text contains this string (not shown); repeat for several.", show_default=False),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Go on past <|endoftext|> (and a chat template's end; by default a row ends there)."),
    chat: bool = typer.Option(False, "--chat", help="Ask each prompt as a user message through the run's chat template (a run from adl sft); the reply ends at the template's end token."),
    seed: int = typer.Option(0, "--seed", help="Random seed; sample r of the run draws from seed + r, whatever else is batched."),
    num_samples: int = typer.Option(1, "--num-samples", help="Samples per prompt (they share the prompt's prefill)."),
    draft: Path = typer.Option(None, "--draft", help="Speculative decoding: a smaller run with the same tokenizer drafts tokens that this run verifies (same output distribution; greedy output identical).", show_default=False),
    lookup: int = typer.Option(None, "--lookup", help="Prompt-lookup decoding: draft the tokens that followed the last N-gram's earlier occurrence in the text (no draft model).", show_default=False),
    lookahead: int = typer.Option(4, "--lookahead", help="Tokens drafted per verification pass with --draft or --lookup (one prompt at a time)."),
    compile: bool = typer.Option(False, "--compile", help="Decode through torch.compile over static caches (with --draft: the draft's steps and the target's verification passes); compiling takes seconds, it pays on long generations (adl bench-inference measures it)."),
    quant: str = typer.Option(None, "--quant", help="Decode with weight-only int8 (per output channel) or int4 (groups of 32) weights, rounded to nearest.", show_default=False),
    stream: bool = typer.Option(None, "--stream/--no-stream", help="Print tokens as they come (default: on for one prompt and one sample in a terminal; with --draft or --lookup the text comes whole at the end).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: each completion's text, token ids, log-probabilities and finish reason."),
) -> None:
    """Sample from a trained model: [bold]adl generate runs/tiny --prompt "The with statement"[/]

    Past the model's context window a row drops the oldest quarter of its window and goes on
    (one prefill of the rest); every command that decodes does the same."""
    import json
    import sys
    import time

    import torch

    from adl_cli.console import console, console_err
    from adl_cli.errors import AdlError
    from adl_cli.inference.engine import Completion, TextStream, generate_batch, row_generators
    from adl_cli.methods.generate import check_sampling, load_decoding_run, load_draft

    params = check_sampling(temperature, top_k, top_p, max_new_tokens, min_p=min_p, repetition_penalty=repetition_penalty)
    if num_samples < 1:
        raise AdlError(f"--num-samples must be >= 1, got {num_samples}")
    if batch < 1:
        raise AdlError(f"--batch must be >= 1, got {batch}")
    if draft is not None and lookup is not None:
        raise AdlError("--draft and --lookup are two ways to draft tokens: give one")
    if prompt is not None and prompt_file is not None:
        raise AdlError("--prompt and --prompt-file both give prompts: give one")
    if prompt == "":
        raise AdlError("--prompt is empty (leave it out to sample from <|endoftext|>)")
    texts = [prompt] if prompt is not None else [""]
    if prompt_file is not None:
        texts = read_prompt_file(prompt_file)
    run = load_decoding_run(run_dir, quant=quant)
    model, tok = run.model, run.tokenizer
    eos = None if ignore_eos else tok.eot_id
    spec_eos = eos  # speculative decoding stops at one id
    if chat:
        from adl_cli.data.chat import ChatTemplate

        template = ChatTemplate.of(tok)
        if template is None:
            raise AdlError(f"{run_dir} has no chat template (--chat needs a run fine-tuned by adl sft)")
        if not any(texts):
            raise AdlError("--chat asks a question: give --prompt or --prompt-file")
        prompts = [template.question(t) for t in texts]
        if not ignore_eos:
            eos, spec_eos = sorted(template.stop_ids), template.end_id
    else:
        prompts = [list(tok.encode(t)) if t else [tok.eot_id] for t in texts]
    stops = list(stop or [])
    sep = "\n" if chat else ""  # a chat reply goes under its question; a continuation follows its prompt
    speculative = draft is not None or lookup is not None
    draft_model = load_draft(draft, run) if draft is not None else None
    if stream is None:
        stream = len(prompts) == 1 and num_samples == 1 and not as_json and sys.stdout.isatty()
    if stream and (len(prompts) > 1 or num_samples > 1 or as_json):
        raise AdlError("--stream shows one completion as it comes: give one prompt, one sample and no --json")

    start = time.perf_counter()
    spec_stats = []
    if speculative:
        from adl_cli.inference.speculative import speculative_generate

        done = []
        for p_i, ids in enumerate(prompts):
            for j in range(num_samples):
                g = torch.Generator().manual_seed(seed + p_i * num_samples + j)
                out, stats = speculative_generate(model, torch.tensor([ids]), max_new_tokens, params=params, draft=draft_model,
                                                  lookup_ngram=lookup, lookahead=lookahead, generator=g, stop_token=spec_eos, compile=compile)
                done.append(_finish_speculative(Completion(list(ids), out[0, len(ids):].tolist()), spec_eos, stops, tok.decode))
                spec_stats.append(stats)
        if stream:
            console.print(texts[0], style="bold", end=sep, highlight=False, markup=False)
            console.print(done[0].text, highlight=False, markup=False)
    else:
        on_token = None
        if stream:
            shown = TextStream(tok.decode, stops, eos)
            console.print(texts[0], style="bold", end=sep, highlight=False, markup=False)

            def on_token(row: int, token: int) -> None:
                piece = shown.push(token)
                if piece:
                    console.print(piece, end="", highlight=False, markup=False)
                    console.file.flush()

        done = []
        per_call = max(1, batch // num_samples)
        for b in range(0, len(prompts), per_call):
            group = prompts[b:b + per_call]
            gens = row_generators(seed + b * num_samples, len(group) * num_samples)
            done += generate_batch(model, group, max_new_tokens, params, n=num_samples, generator=gens, eos_id=eos, stop=stops,
                                   decode=tok.decode, logprobs=as_json, on_token=on_token, compile=compile)
        if stream:
            console.print(shown.finish(done[0].text), highlight=False, markup=False)
    wall = time.perf_counter() - start
    new_tokens = sum(len(c.tokens) for c in done)

    if as_json:
        rows = [{"prompt": texts[i // num_samples], "sample": i % num_samples, "text": c.text, "finish_reason": c.finish,
                 "stop": c.stop, "tokens": c.tokens, **({"logprobs": c.logprobs} if c.logprobs else {})} for i, c in enumerate(done)]
        out = {"run": str(run_dir), "completions": rows, "new_tokens": new_tokens, "seconds": round(wall, 4)}
        if spec_stats:
            out["speculative"] = [{"drafted": s.drafted, "accepted": s.accepted, "target_forwards": s.target_forwards,
                                   "tokens_per_forward": s.tokens_per_forward, "slides": s.slides} for s in spec_stats]
        print(json.dumps(out))
        return
    if not stream:
        several = len(done) > 1
        for i, c in enumerate(done):
            if several:
                parts = [f"prompt {i // num_samples + 1}"] if len(prompts) > 1 else []
                parts += [f"sample {i % num_samples + 1}"] if num_samples > 1 else []
                console.print(f"[bold]--- {', '.join(parts)}[/]")
            console.print(texts[i // num_samples], style="bold", end=sep, highlight=False, markup=False)
            console.print(c.text, highlight=False, markup=False)
    for s in spec_stats:
        slid = f"; the context window slid {s.slides} times" if s.slides else ""
        console_err.print(f"[dim]{'speculative' if draft is not None else 'prompt lookup'}: {s.accepted}/{s.drafted} drafts "
                          f"accepted ({s.acceptance:.0%}), {s.new_tokens} tokens in {s.target_forwards} target passes "
                          f"({s.tokens_per_forward:.2f} a pass){slid}[/]", highlight=False)
    console_err.print(f"[dim]{new_tokens} new tokens in {wall:.2f} s ({new_tokens / max(wall, 1e-9):.0f} tokens/s)[/]", highlight=False)


def read_prompt_file(path: Path) -> list[str]:
    """One prompt a line (the line break not included); a blank line is an error naming it."""
    from adl_cli.errors import AdlError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AdlError(f"--prompt-file {path} does not exist") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise AdlError(f"--prompt-file {path} is not a UTF-8 text file ({type(e).__name__})") from None
    if not lines:
        raise AdlError(f"--prompt-file {path} holds no prompts")
    for i, line in enumerate(lines):
        if not line.strip():
            raise AdlError(f"--prompt-file {path}: line {i + 1} is blank (one prompt a line)")
    return lines


def _finish_speculative(c, eos, stops: list[str], decode):
    """A speculative completion's finish reason and text (stop strings cut after generation)."""
    from adl_cli.inference.engine import StopStrings

    if eos is not None and c.tokens and c.tokens[-1] == eos:
        c.finish, c.text = "eos", decode(c.tokens[:-1])
        return c
    c.text = decode(c.tokens)
    hit = StopStrings(stops).find(c.text, 0)
    if hit is not None:
        c.finish, c.stop, c.text = "stop", hit[1], c.text[: hit[0]]
    return c


def register(app: typer.Typer) -> None:
    app.command("generate", rich_help_panel="Use")(generate)
