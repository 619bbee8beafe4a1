"""adl tokenizer: train a byte-level BPE on a corpus; encode text with a tokenizer."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.errors import AdlError

tok_app = typer.Typer(help="Train and use tokenizers.", no_args_is_help=True)


@tok_app.command("train")
def train(
    corpus_arg: str = typer.Argument(None, help="pydoc | stdlib | a text file, folder or glob (default pydoc), as for `adl data shard`.", metavar="CORPUS", show_default=False),
    corpus: str = typer.Option(None, "--corpus", help="The same as the CORPUS argument (kept for older scripts)."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Ids in the vocabulary, <|endoftext|> included."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the ranks file (tiktoken format, .tiktoken)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
) -> None:
    """Train a byte-level BPE: [bold]adl tokenizer train pydoc --vocab-size 4096 --out bpe.tiktoken[/]"""
    import time

    from adl_cli.data import bpe
    from adl_cli.data.corpus import load_documents
    from adl_cli.data.tokenizer import from_ranks_file
    from adl_cli.console import console

    if corpus_arg and corpus and corpus_arg != corpus:
        raise AdlError(f"two corpora given: {corpus_arg} and --corpus {corpus}; give one")
    corpus = corpus_arg or corpus or "pydoc"
    if vocab_size < 258:
        raise AdlError(f"--vocab-size must be at least 258 (256 bytes, one merge, <|endoftext|>), got {vocab_size}")
    if out.exists() and out.is_dir():
        raise AdlError(f"--out {out} is a folder; give a file name such as {out / 'bpe.tiktoken'}")
    if out.exists() and not force:
        raise AdlError(f"--out {out} exists; choose another name or pass --force to replace it")
    if not out.parent.is_dir():
        raise AdlError(f"folder {out.parent} does not exist" if not out.parent.exists() else f"{out.parent} is a file, not a folder")
    text = "\n\n".join(load_documents(corpus))
    t0 = time.perf_counter()
    with console.status(f"training BPE on {len(text):,} characters ..."):
        try:
            ranks = bpe.train_bpe(text, vocab_size - 1)
        except ValueError as e:
            raise AdlError(str(e)) from None
    bpe.save_ranks(ranks, out)
    tok = from_ranks_file(out)
    ids = tok.encode(text[:200_000])
    chars = len(text[:200_000])
    console.print(f"wrote {out}: {tok.vocab_size} ids in {time.perf_counter() - t0:.1f} s; {chars / max(1, len(ids)):.2f} characters per token on the corpus")


@tok_app.command("encode")
def encode(
    text: str = typer.Argument(..., help="Text to encode."),
    tokenizer: str = typer.Option("bytes", "--tokenizer", help="bytes | gpt2 | a .tiktoken file | a run folder."),
) -> None:
    """Show the ids and pieces of a text: [bold]adl tokenizer encode "def f(x):" --tokenizer runs/tiny[/]"""
    from rich.table import Table

    from adl_cli.data.tokenizer import Tokenizer, make_tokenizer
    from adl_cli.console import console

    path = Path(tokenizer)
    tok = Tokenizer.load(path) if path.is_dir() else make_tokenizer(tokenizer)
    ids = tok.encode(text)
    t = Table("id", "piece", title=f"{len(ids)} tokens ({tok.describe()})", title_justify="left")
    for i in ids:
        t.add_row(str(int(i)), repr(tok.decode([int(i)])))
    console.print(t)
    console.print("ids: " + " ".join(str(int(i)) for i in ids), highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(tok_app, name="tokenizer", rich_help_panel="Data")
