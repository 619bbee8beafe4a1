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
) -> None:
    """Sample from a trained model: [bold]adl generate runs/tiny --prompt "The with statement"[/]"""
    import torch

    from adl_cli.data.tokenizer import Tokenizer
    from adl_cli.console import console, console_err
    from adl_cli.errors import AdlError
    from adl_cli.methods.generate import check_sampling
    from adl_cli.methods.generate import generate as sample
    from adl_cli.runs import load_run

    check_sampling(temperature, top_k, top_p, max_new_tokens, min_p=min_p, repetition_penalty=repetition_penalty)
    if num_samples < 1:
        raise AdlError(f"--num-samples must be >= 1, got {num_samples}")
    run = load_run(run_dir)
    model, tok = run.model, run.tokenizer
    if tok is None:
        raise AdlError(f"{run_dir} has no tokenizer.json: generate needs the run's tokenizer")
    ids = list(tok.encode(prompt)) if prompt else [tok.eot_id]
    block = model.config.block_size
    if len(ids) > block:
        console_err.print(f"[yellow]warning:[/] the prompt has {len(ids)} tokens, the context is {block}: keeping the last {block}", soft_wrap=True)
        ids = ids[-block:]
    g = torch.Generator().manual_seed(seed)
    for i in range(num_samples):
        idx = torch.tensor([ids], dtype=torch.long)
        out = sample(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=g, min_p=min_p,
                     repetition_penalty=repetition_penalty)
        text = tok.decode(out[0, len(ids):].tolist())
        if num_samples > 1:
            console.print(f"[bold]--- sample {i + 1}[/]")
        console.print(prompt, style="bold", end="", highlight=False, markup=False)
        console.print(text, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("generate", rich_help_panel="Use")(generate)
