"""adl generate: sample text from a trained run."""

from __future__ import annotations

from pathlib import Path

import typer


def generate(
    run_dir: Path = typer.Argument(..., help="A run folder written by adl pretrain (or adl import).", show_default=False),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue (empty: start from <|endoftext|>)."),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens", "-n", help="How many tokens to sample."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Softmax temperature; 0 is greedy."),
    top_k: int = typer.Option(None, "--top-k", help="Sample only among the k most likely tokens."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling: the smallest set with this much mass."),
    min_p: float = typer.Option(None, "--min-p", help="Min-p sampling: drop tokens less likely than this fraction of the top token's probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Divide (positive) or multiply (negative) the logits of tokens already in the text by this; 1 is off, above 1 discourages repeats."),
    seed: int = typer.Option(0, "--seed", help="Random seed, for reproducible samples."),
    num_samples: int = typer.Option(1, "--num-samples", help="Independent samples to draw."),
    draft: Path = typer.Option(None, "--draft", help="Speculative decoding: a smaller run with the same tokenizer drafts tokens that this run verifies (same output distribution; greedy output identical)."),
    lookup: int = typer.Option(None, "--lookup", help="Prompt-lookup decoding: draft the tokens that followed the last N-gram's earlier occurrence in the text (no draft model)."),
    quant: str = typer.Option(None, "--quant", help="Decode with weight-only int8 (per output channel) or int4 (groups of 32) weights, rounded to nearest."),
    lookahead: int = typer.Option(4, "--lookahead", help="Tokens drafted per verification pass with --draft or --lookup (which stop at the end of the context window, where plain sampling slides it)."),
) -> None:
    """Sample from a trained model: [bold]adl generate runs/tiny --prompt "The with statement"[/]"""
    import torch

    from adl_cli.data.tokenizer import Tokenizer
    from adl_cli.console import console, console_err
    from adl_cli.errors import AdlError
    from adl_cli.methods.generate import check_sampling
    from adl_cli.methods.generate import generate as sample
    from adl_cli.runs import load_run

    params = check_sampling(temperature, top_k, top_p, max_new_tokens, min_p=min_p, repetition_penalty=repetition_penalty)
    if num_samples < 1:
        raise AdlError(f"--num-samples must be >= 1, got {num_samples}")
    if draft is not None and lookup is not None:
        raise AdlError("--draft and --lookup are two ways to draft tokens: give one")
    run = load_run(run_dir)
    model, tok = run.model, run.tokenizer
    if quant is not None:
        from adl_cli.inference.quant import quantize_model

        quantize_model(model, quant)
    if tok is None:
        raise AdlError(f"{run_dir} has no tokenizer.json: generate needs the run's tokenizer")
    ids = list(tok.encode(prompt)) if prompt else [tok.eot_id]
    block = model.config.block_size
    if len(ids) > block:
        console_err.print(f"[yellow]warning:[/] the prompt has {len(ids)} tokens, the context is {block}: keeping the last {block}", soft_wrap=True)
        ids = ids[-block:]
    speculative = draft is not None or lookup is not None
    draft_model = None
    if draft is not None:
        from adl_cli.data.shards import tokenizer_fingerprint

        other = load_run(draft)
        if other.tokenizer is None or tokenizer_fingerprint(other.tokenizer) != tokenizer_fingerprint(tok):
            raise AdlError(f"--draft {draft} has another tokenizer than {run_dir}: a draft must share the target's token ids")
        draft_model = other.model
    g = torch.Generator().manual_seed(seed)
    for i in range(num_samples):
        idx = torch.tensor([ids], dtype=torch.long)
        if speculative:
            from adl_cli.inference.speculative import speculative_generate

            out, stats = speculative_generate(model, idx, max_new_tokens, params=params, draft=draft_model, lookup_ngram=lookup,
                                              lookahead=lookahead, generator=g)
        else:
            stats = None
            out = sample(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=g, min_p=min_p,
                         repetition_penalty=repetition_penalty)
        text = tok.decode(out[0, len(ids):].tolist())
        if num_samples > 1:
            console.print(f"[bold]--- sample {i + 1}[/]")
        console.print(prompt, style="bold", end="", highlight=False, markup=False)
        console.print(text, highlight=False, markup=False)
        if stats is not None:
            end = "; stopped at the end of the context" if stats.stopped_at_context else ""
            console_err.print(f"[dim]{'speculative' if draft is not None else 'prompt lookup'}: {stats.accepted}/{stats.drafted} drafts "
                              f"accepted ({stats.acceptance:.0%}), {stats.new_tokens} tokens in {stats.target_forwards} target passes "
                              f"({stats.tokens_per_forward:.2f} a pass){end}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("generate", rich_help_panel="Use")(generate)
