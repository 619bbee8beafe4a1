"""Sampling from a GPT: a tensor-in, tensor-out front to the engine (adl_cli/inference/engine.py),
whose rules (sampling, stopping, the context policy) it follows; the rules of the next-token draw
(temperature, top-k, top-p, min-p, repetition penalty) are adl_cli.inference.sampling's.
"""

from __future__ import annotations

import torch

from adl_cli.errors import AdlError, opt
from adl_cli.inference.sampling import SamplingParams


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int, *,
                   min_p: float | None = None, repetition_penalty: float = 1.0) -> SamplingParams:
    """The sampling settings, checked (one clear error for a bad one)."""
    if max_new_tokens < 0:
        raise AdlError(f"{opt('max_new_tokens')} must be >= 0, got {max_new_tokens}")
    return SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty).validate()


@torch.no_grad()
def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens sampled tokens; temperature 0 is greedy; past the
    context each row slides its window (the engine's policy).

    With ``stop_token`` each row ends on its own when it samples it: later positions of a
    finished row hold ``stop_token``; generation ends when every row has finished."""
    from adl_cli.inference.engine import generate_batch

    params = check_sampling(temperature, top_k, top_p, max_new_tokens, min_p=min_p, repetition_penalty=repetition_penalty)
    done = generate_batch(model, idx.tolist(), max_new_tokens, params, generator=generator, eos_id=stop_token)
    width = max(len(c.tokens) for c in done)
    fill = 0 if stop_token is None else stop_token
    new = torch.tensor([c.tokens + [fill] * (width - len(c.tokens)) for c in done], dtype=idx.dtype, device=idx.device)
    return torch.cat((idx, new.view(len(done), width)), dim=1)


def load_decoding_run(run_dir, *, quant: str | None = None, command: str = "generate", device="cpu"):
    """A run ready to decode: its tokenizer present (a clear error naming ``command`` if not) and,
    with ``quant``, its linear layers quantized (adl_cli/inference/quant.py)."""
    from adl_cli.runs import load_run

    run = load_run(run_dir, device=device)
    if run.tokenizer is None:
        raise AdlError(f"{run_dir} has no tokenizer.json: {command} needs the run's tokenizer")
    if quant is not None:
        from adl_cli.inference.quant import quantize_model

        quantize_model(run.model, quant)
    return run


def load_draft(draft_dir, target, *, device="cpu"):
    """The model of a draft run for speculative decoding: it must share the target run's token ids."""
    from adl_cli.data.shards import tokenizer_fingerprint
    from adl_cli.runs import load_run

    draft = load_run(draft_dir, device=device)
    if target.tokenizer is not None:
        if draft.tokenizer is None or tokenizer_fingerprint(draft.tokenizer) != tokenizer_fingerprint(target.tokenizer):
            raise AdlError(f"{opt('draft')} {draft_dir} has another tokenizer than {target.path}: a draft must share the target's token ids")
    elif draft.config.vocab_size != target.config.vocab_size:
        raise AdlError(f"{opt('draft')} {draft_dir} has another vocabulary ({draft.config.vocab_size}) than {target.path} ({target.config.vocab_size})")
    return draft.model
