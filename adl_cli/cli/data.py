"""adl data shard: tokenize a corpus into llm.c-style .bin token shards."""

from __future__ import annotations

from pathlib import Path

import typer

data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)


@data_app.command("shard")
def shard(
    corpus: str = typer.Argument(..., help="pydoc | stdlib | a text file, folder or glob.", show_default=False, metavar="CORPUS"),
    tokenizer: str = typer.Option("bpe", "--tokenizer", help="bytes | bpe (trained on the corpus) | gpt2 | a .tiktoken file."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Ids in a bpe tokenizer trained on the corpus."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the shards, shards.json and the tokenizer file."),
    shard_tokens: int = typer.Option(100_000_000, "--shard-tokens", help="Tokens per shard (the last one holds the rest)."),
    val_shard: bool = typer.Option(False, "--val-shard", help="Name the first shard *_val_000000.bin (llm.c's layout)."),
    prefix: str = typer.Option(None, "--prefix", help="File name prefix (default: the corpus name)."),
    force: bool = typer.Option(False, "--force", help="Replace the shards already in --out (all of them, and their tokenizer)."),
) -> None:
    """Write token shards: [bold]adl data shard pydoc --tokenizer bpe --out data/pydoc --shard-tokens 50000[/]"""
    import time

    from rich.table import Table

    from adl_cli.data.shards import shard_corpus
    from adl_cli.console import console

    t0 = time.perf_counter()
    with console.status(f"tokenizing {corpus} ..."):
        m = shard_corpus(corpus, tokenizer, out, shard_tokens, vocab_size=vocab_size, val_shard=val_shard, prefix=prefix, force=force)
    t = Table("file", "split", "tokens", title=f"{len(m['shards'])} shards, {m['tokens']:,} tokens in {time.perf_counter() - t0:.1f} s", title_justify="left")
    shown = m["shards"] if len(m["shards"]) <= 12 else m["shards"][:5] + [{"file": "...", "split": "", "tokens": ""}] + m["shards"][-5:]
    for s in shown:
        t.add_row(s["file"], s["split"], f"{s['tokens']:,}" if s["tokens"] != "" else "")
    console.print(t)
    tok = f"{out / m['tokenizer_file']}" if "tokenizer_file" in m else m["tokenizer"]
    glob = out / ("*_train_*.bin" if val_shard else "*.bin")
    console.print(
        f"tokenizer {m['tokenizer']} ({m['vocab_size']} ids). Train on it: "
        f"[bold]adl pretrain RECIPE --set data.corpus=shards:{glob} --set data.tokenizer={tok}[/]",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data", rich_help_panel="Data")
