"""adl eval: how well a run predicts a text, measured the way training measures its held-out split.

Every token of the text is scored once, in consecutive windows of the model's context (the last
window end-aligned, its already-scored positions left out), batched and without a decode state:

    loss          mean next-token cross-entropy, nats
    perplexity    exp(loss)
    bits / byte   loss / ln 2 x tokens / UTF-8 bytes (<|endoftext|> counts no bytes): comparable
                  across tokenizers, the figure adl pretrain reports as val bits per byte

The text is the run's own held-out split (its recipe's [data] table: the same split, dedup and
tokenizer as training), the corpus side it trained on (``split="train"``: the corpus's own
training text, not the extra corpora), or any corpus spec (built-in name, file, folder, glob),
every document of it, each followed by <|endoftext|>.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from adl_cli.errors import AdlError, opt

SPLITS = ("val", "train")


@dataclass
class EvalResult:
    text: str
    tokens: int  # tokens scored
    loss: float
    perplexity: float
    bits_per_byte: float
    bytes_per_token: float
    seconds: float
    tokens_per_s: float
    context: int
    batch_size: int
    precision: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_tokens(run, data: str | None, split: str) -> tuple[np.ndarray, str]:
    """(the token stream, what it is) for a run: its recipe's split, or a corpus spec's documents."""
    from adl_cli.data.corpus import load_documents

    tok = run.tokenizer
    if tok is None:
        raise AdlError(f"{run.path} has no tokenizer.json: eval needs the run's tokenizer")
    if data is not None:
        ids = []
        for doc in load_documents(data):
            ids += list(tok.encode(doc)) + [tok.eot_id]
        return np.asarray(ids, dtype=np.int64), data
    if split not in SPLITS:
        raise AdlError(f"{opt('split')} must be one of {', '.join(SPLITS)}, got '{split}'")
    recipe_path = Path(run.path) / "recipe.toml"
    if not recipe_path.exists():
        raise AdlError(f"{run.path} has no recipe.toml (it was not trained by adl pretrain): name a text with {opt('data')}")
    from adl_cli.data.tokens import load_tokens

    section = _text_recipe(recipe_path).data
    tokens = load_tokens(section, tokenizer=tok)
    stream = tokens.val if split == "val" else tokens.corpus_train
    return np.asarray(stream), f"{section.corpus} ({split} split of the run's recipe)"


def _text_recipe(path: Path):
    """A text run's recipe: adl pretrain's, or adl distill's (the same tables plus [teacher] and [distill])."""
    import tomllib

    try:
        distilled = "teacher" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        distilled = False  # the loader reports it
    if distilled:
        from adl_cli.methods.distill import load_distill_recipe

        return load_distill_recipe(path)
    from adl_cli.methods.pretrain import load_pretrain_recipe

    return load_pretrain_recipe(path)


@torch.no_grad()
def evaluate_tokens(model, tokenizer, tokens: np.ndarray, *, batch_size: int = 16, precision: str = "fp32", text: str = "") -> EvalResult:
    """Score every token of ``tokens`` once (see the module's docstring)."""
    from adl_cli.data.tokens import split_windows

    if batch_size < 1:
        raise AdlError(f"{opt('batch_size')} must be >= 1, got {batch_size}")
    if precision not in ("fp32", "bf16"):
        raise AdlError(f"{opt('precision')} must be fp32 or bf16, got '{precision}'")
    block = model.config.block_size
    block = min(block, len(tokens) - 1)
    if block < 1:
        raise AdlError(f"the text has {len(tokens)} tokens: eval needs at least 2")
    last = min(getattr(model.config, "latents", block), block)  # Perceiver AR scores its latents' positions only
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for x, y in split_windows(tokens, block, batch_size, score_last=last):
            n = int((y != -100).sum())
            total += float(model(x.to(device), y.to(device))[1].float()) * n
            count += n
    seconds = time.perf_counter() - start
    loss = total / count
    scored = tokens[1 + block - last:]  # (split_windows never scores the first block - last targets)
    bpt = tokenizer.token_bytes(scored) / count
    if bpt <= 0:
        raise AdlError("the text has no bytes to score (only special tokens)")
    return EvalResult(text, count, loss, math.exp(min(loss, 700.0)), loss / math.log(2) / bpt, bpt, seconds, count / seconds, block,
                      batch_size, precision)
