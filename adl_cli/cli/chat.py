"""adl chat: talk with a run in the terminal."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer"


def chat(
    run_dir: Path = typer.Argument(..., help="A run folder (adl sft gives one a chat template; adl pretrain or adl import ones continue plain text).", show_default=False),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n", help="The longest answer, in tokens."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="Softmax temperature; 0 is greedy."),
    top_k: int = typer.Option(None, "--top-k", help="Sample only among the k most likely tokens.", show_default=False),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling: the smallest set with this much mass."),
    min_p: float = typer.Option(None, "--min-p", help="Drop tokens less likely than this fraction of the top token's probability.", show_default=False),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty", help="Discourage tokens already in the conversation (1 is off)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (turn i draws from seed + i)."),
    quant: str = typer.Option(None, "--quant", help="Answer with weight-only int8 or int4 weights.", show_default=False),
) -> None:
    """Talk with a model: [bold]adl chat runs/tiny[/]. Lines come from the keyboard or a pipe;
    /reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C stops the current answer."""
    import sys

    from rich.markup import escape

    from adl_cli.console import console, console_err
    from adl_cli.errors import AdlError
    from adl_cli.inference.chat import NOTE, ChatSession
    from adl_cli.methods.generate import check_sampling, load_decoding_run

    params = check_sampling(temperature, top_k, top_p, max_new_tokens, min_p=min_p, repetition_penalty=repetition_penalty)
    if max_new_tokens < 1:
        raise AdlError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    run = load_decoding_run(run_dir, quant=quant, command="chat")
    session = ChatSession(run.model, run.tokenizer, params, max_new_tokens, seed)
    interactive = sys.stdin.isatty()
    note = f"{NOTE.format(run=run_dir)}\n" if session.template is None else ""
    console_err.print(f"[dim]{note}{HELP}[/]", highlight=False)

    def show(piece: str) -> None:
        console.print(piece, end="", highlight=False, markup=False)
        console.file.flush()

    while True:
        try:
            if interactive:
                line = console.input("[bold]you>[/] ")
            else:
                line = sys.stdin.readline()
                if not line:
                    break
        except KeyboardInterrupt:
            console.print()
            continue
        except EOFError:
            console.print()
            break
        line = line.rstrip("\r\n")
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            console_err.print("[dim](the conversation is forgotten)[/]")
            continue
        if command.startswith("/") and " " not in command:
            console_err.print(f"[yellow]unknown command {command}:[/] {HELP}", highlight=False)
            continue
        if not interactive:  # a piped conversation reads as a transcript
            console.print(f"[bold]you>[/] {escape(line)}", highlight=False)
        console.print("[bold]adl>[/] ", end="")
        answer = session.ask(line, show)
        console.print()
        if answer.interrupted:
            console_err.print("[dim](stopped)[/]")


def register(app: typer.Typer) -> None:
    app.command("chat", rich_help_panel="Use")(chat)
