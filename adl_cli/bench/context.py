"""Context extension: perplexity by evaluation length for a model trained at a short context.

A model trained on windows of L tokens is read on windows of L' = s L tokens. The
perplexity at each length is exp of the mean next-token cross-entropy over the same
validation tokens, cut into windows of L' (so a longer window only adds context):

    ppl(L') = exp( -1/N sum_t log p(x_{t+1} | the window's tokens up to t) ).

Plain RoPE extrapolates: past L the rotation angles m theta_i of its slow dimensions
were never seen in training, and perplexity climbs. Position interpolation (Chen et al.,
2023), NTK-aware scaling (bloc97, 2023) and YaRN (Peng et al., 2023) rescale the
frequencies by s = L' / L at evaluation time (``position.with_position``; nothing is
learned), and a short fine-tune at L' with the scaled frequencies recovers the rest
(the experiment of the PI and YaRN papers, at a small scale). ALiBi (Press et al., 2021)
needs no rescaling: it is read at every length as trained.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adl_cli.errors import AdlError, opt

ROPE_FAMILY = ("rope", "pi", "ntk", "yarn")
SCALED = ("pi", "ntk", "yarn")  # the variants whose frequencies depend on the scale s


@dataclass
class ContextRow:
    """One cell of the table: a position variant read at one length."""

    position: str
    mode: str  # "zero-shot" or "finetuned"
    length: int
    scale: float | None  # the s given to pi/ntk/yarn; None for rope, alibi, ...
    loss: float
    ppl: float
    ratio: float  # ppl / the run's own perplexity at its trained length
    tokens: int  # tokens scored
    passkey: float | None = None  # share of passkey trials retrieved at this length (--passkey)


@dataclass
class ContextReport:
    run_dir: Path
    trained_length: int
    run_position: str
    lengths: list[int]
    positions: list[str]
    windows: int  # windows of the longest length scored at every length
    reference_ppl: float
    rows: list[ContextRow]
    kv_cache: list[dict[str, Any]]
    finetune: dict[str, Any] = field(default_factory=dict)
    passkey_trials: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "trained_length": self.trained_length,
            "run_position": self.run_position,
            "lengths": self.lengths,
            "positions": self.positions,
            "windows": self.windows,
            "reference_ppl": self.reference_ppl,
            "rows": [{k: _finite(v) for k, v in dataclasses.asdict(r).items()} for r in self.rows],
            "kv_cache": self.kv_cache,
            "finetune": self.finetune,
            "passkey_trials": self.passkey_trials,
        }


def _finite(v):
    """JSON has no infinity: a perplexity that overflowed is written as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ------------------------------------------------------------------ parsing and checks


def parse_lengths(text: str | list[int]) -> list[int]:
    """'256,512,1024' -> [256, 512, 1024] (sorted, unique); each >= 2."""
    items = text if isinstance(text, list) else [p.strip() for p in str(text).split(",") if p.strip()]
    out = []
    for item in items:
        try:
            n = int(item)
        except (TypeError, ValueError):
            raise AdlError(f"{opt('lengths')}: '{item}' is not an integer (give a comma list such as 256,512,1024)") from None
        if n < 2:
            raise AdlError(f"{opt('lengths')}: each length must be >= 2, got {n}")
        out.append(n)
    if not out:
        raise AdlError(f"{opt('lengths')}: give at least one length, e.g. {opt('lengths')} 128,256,512")
    return sorted(set(out))


def parse_positions(text: str | list[str] | None, run_position: str) -> list[str]:
    """The position variants to compare; None -> every variant the run allows."""
    if text is None:
        return list(ROPE_FAMILY) if run_position in ROPE_FAMILY else [run_position]
    items = text if isinstance(text, list) else [p.strip() for p in str(text).split(",") if p.strip()]
    if not items:
        raise AdlError(f"{opt('position')}: give at least one of rope, pi, ntk, yarn, alibi")
    out: list[str] = []
    for name in items:
        if name not in out:
            out.append(name)
    return out


def check_positions(positions: list[str], run_position: str, trained: int) -> None:
    """A trained model can be read with another RoPE variant, or with its own encoding."""
    from adl_cli.errors import closest
    from adl_cli.nn.position import POSITIONS

    for name in positions:
        if name not in POSITIONS:
            raise AdlError(f"{opt('position')}: unknown position '{name}'{closest(name, POSITIONS.names())}; choose from: rope, pi, ntk, yarn, alibi")
        if run_position == "learned":
            raise AdlError(
                f"{opt('position')} {name}: this run was trained with learned positions, a table of {trained} vectors that cannot "
                f"extend beyond block_size={trained}; context extension needs a run trained with position=rope "
                "(e.g. adl pretrain recipes/pretrain/tiny-rope.toml) or alibi"
            )
        if name == run_position:
            continue
        if name in ROPE_FAMILY and run_position in ROPE_FAMILY:
            continue
        if name in ROPE_FAMILY:
            raise AdlError(
                f"{opt('position')} {name}: the run must have been trained with rope to be read with '{name}' "
                f"(it was trained with position={run_position}); use {opt('position')} {run_position}"
            )
        raise AdlError(
            f"{opt('position')} {name}: the run was trained with position={run_position}; "
            f"'{name}' would need retraining (use {opt('position')} {run_position})"
        )


def check_scale(scale: float | None) -> None:
    if scale is not None and (not math.isfinite(scale) or scale < 1.0):
        raise AdlError(f"{opt('scale')} must be a finite number >= 1 (the context multiple s), got {scale}")


# ------------------------------------------------------------------ evaluation


def position_options(name: str, base: dict[str, Any], scale: float | None, trained: int) -> dict[str, Any]:
    """Options for ``with_position``: the run's theta, plus s for pi/ntk/yarn."""
    opts: dict[str, Any] = {}
    if name in ROPE_FAMILY and "theta" in base:
        opts["theta"] = base["theta"]
    if name in SCALED:
        opts["scale"] = float(scale if scale is not None else 1.0)
    if name == "yarn":
        opts["original_max_position"] = trained
    if name not in ROPE_FAMILY:
        opts = dict(base)  # the run's own encoding, as trained
    return opts


def eval_span(val, lengths: list[int], windows: int | None, cap: int = 16, cap_tokens: int = 8192) -> tuple[int, int]:
    """(windows of the longest length, span in tokens): the same tokens are scored at every
    length. By default as many windows as fit, up to max(16 windows, 8192 tokens)."""
    longest = max(lengths)
    fit = (len(val) - 1) // longest
    if fit < 1:
        raise AdlError(
            f"{opt('lengths')}: {longest} tokens is beyond the validation split ({len(val):,} tokens); "
            f"use lengths up to {len(val) - 1} or a bigger corpus"
        )
    if windows is None:
        windows = min(fit, max(cap, cap_tokens // longest))
    if windows < 1:
        raise AdlError(f"{opt('batches')} must be >= 1, got {windows}")
    if windows > fit:
        raise AdlError(
            f"{opt('batches')} {windows}: the validation split ({len(val):,} tokens) holds only {fit} windows of {longest} tokens; "
            f"use {opt('batches')} {fit} or shorter {opt('lengths')}"
        )
    return windows, windows * longest


@torch.no_grad()
def perplexity(model, val, length: int, span: int, *, max_tokens: int = 8192) -> tuple[float, int]:
    """(mean cross-entropy in nats, tokens scored) over the first ``span`` tokens of
    ``val`` cut into windows of ``length`` (each predicting its next token)."""
    n = span // length
    device = next(model.parameters()).device
    chunk = np.asarray(val[: n * length + 1], dtype=np.int64)
    x_all = torch.from_numpy(chunk[:-1].reshape(n, length))
    y_all = torch.from_numpy(chunk[1:].reshape(n, length))
    per_batch = max(1, max_tokens // length)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, n, per_batch):
            x, y = x_all[i : i + per_batch].to(device), y_all[i : i + per_batch].to(device)
            _, loss = model(x, y)
            total += float(loss) * x.numel()
            count += x.numel()
    finally:
        model.train(was_training)
    return total / count, count


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def kv_cache_table(cfg, length: int, dtype_bytes: int = 2) -> list[dict[str, Any]]:
    """KV-cache bytes per token (and for one sequence of ``length``) for MHA, GQA and MLA at the run's shape."""
    from adl_cli.models.gpt import GPTConfig
    from adl_cli.nn.attention.cache import kv_cache_bytes_per_token

    base = dict(cfg.to_dict(), attention="sdpa", attention_options={})
    # the run's own grouping if it has one, else groups of 4 query heads (2 when there are fewer than 8 heads)
    group = 4 if cfg.n_head >= 8 else 2
    gqa_heads = cfg.kv_heads if cfg.kv_heads < cfg.n_head else max(d for d in range(1, cfg.n_head // group + 2) if cfg.n_head % d == 0 and d <= max(1, cfg.n_head // group))
    rope_position = cfg.position if cfg.position in ROPE_FAMILY else "rope"
    shapes = [
        ("MHA", dict(base, n_kv_head=cfg.n_head), f"k, v: {cfg.n_head} heads x {cfg.head_dim}"),
        ("GQA", dict(base, n_kv_head=gqa_heads), f"k, v: {gqa_heads} head{'s' if gqa_heads > 1 else ''} x {cfg.head_dim}"),
        ("MLA", dict(base, n_kv_head=cfg.n_head, attention="mla", position=rope_position, position_options={}), None),
    ]
    rows = []
    for name, d, shape in shapes:
        c = GPTConfig.from_dict(d)
        per_token = kv_cache_bytes_per_token(c, dtype_bytes)
        held = decode_state_bytes(c, length, dtype_bytes)
        if held != per_token * length:  # the formula and the model's own decode state must agree
            raise AssertionError(f"{name}: the decode state holds {held:,} bytes for {length} tokens, the formula says {per_token * length:,}")
        if shape is None:
            from adl_cli.nn.attention.mla import mla_dims

            m = mla_dims(c)
            shape = f"latent {m.kv_lora_rank} + rope key {m.rope_head_dim} (defaults)"
        rows.append({"attention": name, "shape": shape, "bytes_per_token": per_token, "bytes_at_length": per_token * length, "length": length, "dtype_bytes": dtype_bytes})
    return rows


def decode_state_bytes(cfg, length: int, dtype_bytes: int) -> int:
    """Bytes of the decode state the model itself sets up for one sequence of ``length`` tokens
    (built on the meta device: nothing is allocated)."""
    from adl_cli.models.gpt import GPT

    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    with torch.device("meta"):
        model = GPT(dataclasses.replace(cfg, block_size=max(cfg.block_size, length), vocab_size=max(cfg.vocab_size, 1)))
        return model.setup_cache(1, length, dtype=dtype, device="meta").nbytes()


# ------------------------------------------------------------------ fine-tuning


def finetune_at_length(
    model,
    data,
    recipe,
    length: int,
    steps: int,
    out_dir: Path,
    *,
    lr: float | None = None,
    tokenizer=None,
    progress: bool = False,
):
    """Train ``model`` (already carrying the position it is tuned with) for ``steps`` steps
    on windows of ``length`` from the run's training split, through the one Trainer.
    About as many tokens per step as pretraining; lr defaults to a tenth of the recipe's.
    Writes metrics, a checkpoint and the tuned model into ``out_dir`` (never the run's own files)."""
    from adl_cli.data.tokens import WindowBatches
    from adl_cli.engine.trainer import Trainer
    from adl_cli.runs import save_run

    tc0 = recipe.train
    tokens_per_step = tc0.batch_size * tc0.grad_accum * recipe.model.block_size
    batch = max(1, tokens_per_step // length)
    lr = lr if lr is not None else tc0.lr / 10
    if not (lr > 0 and math.isfinite(lr)):
        raise AdlError(f"{opt('finetune_lr')} must be a positive number, got {lr}")
    tc = dataclasses.replace(
        tc0,
        steps=steps,
        batch_size=batch,
        grad_accum=1,
        lr=lr,
        min_lr=lr / 10,
        warmup=min(10, steps // 5),
        eval_every=0,
        checkpoint_every=0,
        keep_checkpoints=1,
        log_every=max(1, min(10, steps)),
        compile=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = WindowBatches(data.train, length, tc.batch_size, 1, tc.seed + 17)

    def loss_fn(m, b):
        x, y = b
        return m(x, y)[1]

    trainer = Trainer(
        model,
        tc,
        run_dir=out_dir,
        batch_fn=batches,
        loss_fn=loss_fn,
        units_per_batch=tc.batch_size * length,
        unit="tokens",
        progress=progress,
    )
    result = trainer.fit()
    tuned = trainer.raw_model
    if trainer.acc.is_main_process:
        saved = copy.deepcopy(tuned).cpu()
        saved.config.block_size = length  # the tuned model reads `length` tokens; positions keep their own options
        save_run(out_dir, saved, tokenizer)
    return tuned.eval(), result, tc


# ------------------------------------------------------------------ the bench


def run_shape(run_dir: Path) -> tuple[str, int]:
    """(position, trained block_size) from a run folder's config.json."""
    cfg = _gpt_config(run_dir)
    return cfg.position, cfg.block_size


def _gpt_config(run_dir: Path):
    """The run's config; an adapter run's is its base's with the changes it is read with (a
    LongLoRA run: the longer block, stretched positions), its trained length the base's."""
    from adl_cli.runs import ADAPTER, adapter_meta, read_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AdlError(f"run folder not found: {run_dir} (train one first: adl pretrain recipes/pretrain/tiny-rope.toml)")
    if (run_dir / ADAPTER).exists():
        meta, base = adapter_meta(run_dir)
        cfg = _gpt_config(base)
        changes = {k: v for k, v in (meta.get("model") or {}).items() if k != "block_size"}
        return dataclasses.replace(cfg, **changes)
    cfg = read_config(run_dir)
    if cfg.family != "gpt":
        raise AdlError(f"{run_dir} holds a '{cfg.family}' model; bench-context measures GPT runs")
    return cfg


def load_run(run_dir: Path):
    """(model, recipe, tokenizer) of a pretrain run folder; every problem is an AdlError."""
    from adl_cli.methods.pretrain import load_pretrain_recipe
    from adl_cli.runs import load_run as load

    from adl_cli.runs import ADAPTER, adapter_meta

    _gpt_config(run_dir)
    run_dir = Path(run_dir)
    source = adapter_meta(run_dir)[1] if (run_dir / ADAPTER).exists() else run_dir  # an adapter's data: its base's corpus
    if not (source / "recipe.toml").exists():
        raise AdlError(f"{source} has no recipe.toml: is it an adl pretrain run folder?")
    run = load(run_dir)
    recipe = load_pretrain_recipe(source / "recipe.toml")
    return run.model, recipe, run.tokenizer


def bench_context(
    run_dir: str | Path,
    lengths: list[int] | str,
    positions: list[str] | str | None = None,
    *,
    scale: float | None = None,
    finetune_steps: int = 0,
    finetune_lr: float | None = None,
    batches: int | None = None,
    out_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    passkey: int = 0,
    log: Callable[[str], Any] = lambda *_: None,
) -> ContextReport:
    """Perplexity at each length for each position variant, zero-shot and (with
    ``finetune_steps``) after a short fine-tune at the longest length.

    Zero-shot, pi/ntk/yarn use s = length / trained length at each length (at least 1),
    or the fixed ``scale``. A fine-tuned variant is tuned and read with one fixed s:
    ``scale``, else longest length / trained length. Fine-tunes go to
    ``out_dir/context-<position>/`` (default: inside ``run_dir``).
    """
    from adl_cli.data.tokens import load_tokens
    from adl_cli.nn.position import swapped_position, with_position

    run_dir = Path(run_dir)
    lengths = parse_lengths(lengths)
    check_scale(scale)
    if finetune_steps < 0:
        raise AdlError(f"{opt('finetune_steps')} must be >= 0, got {finetune_steps}")
    if passkey < 0:
        raise AdlError(f"{opt('passkey')} must be >= 0 (trials per length), got {passkey}")
    if finetune_lr is not None and not (math.isfinite(finetune_lr) and finetune_lr > 0):
        raise AdlError(f"{opt('finetune_lr')} must be a positive number, got {finetune_lr}")
    run_position, trained = run_shape(run_dir)
    positions = parse_positions(positions, run_position)
    check_positions(positions, run_position, trained)  # before loading any weights
    model, recipe, tokenizer = load_run(run_dir)
    cfg = model.config
    base_options = dict(cfg.position_options)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)

    log(f"data: corpus {recipe.data.corpus}, tokenizer {tokenizer.describe()}")
    data = load_tokens(recipe.data, tokenizer=tokenizer)
    windows, span = eval_span(data.val, lengths, batches)
    log(
        f"run: {run_dir} trained at {trained} tokens with position={run_position}; scoring the same {span:,} "
        f"validation tokens at lengths {', '.join(map(str, lengths))}"
    )
    if len(data.val) <= trained:
        raise AdlError(f"the validation split ({len(data.val):,} tokens) is shorter than the trained length {trained}; use a bigger corpus")
    ref_loss, _ = perplexity(model, data.val, trained, max(span, trained))

    def passkey_at(m, length: int) -> float | None:
        if not passkey:
            return None
        from adl_cli.bench.passkey import fits, passkey_accuracy

        if not fits(tokenizer, length):
            return None  # too short to hold a question, a key and any filler
        return passkey_accuracy(m, tokenizer, data.val, length, passkey, seed=length)

    reference = _ppl(ref_loss)
    rows: list[ContextRow] = []

    for name in positions:
        for length in lengths:
            s = scale if scale is not None else max(1.0, length / trained)
            try:
                with swapped_position(model, name, **position_options(name, base_options, s, trained)):
                    loss, n = perplexity(model, data.val, length, span)
                    found = passkey_at(model, length)
            except ValueError as e:  # a bad option or swap, named by the position module
                raise AdlError(f"{opt('position')} {name}: {e}") from None
            rows.append(ContextRow(name, "zero-shot", length, s if name in SCALED else None, loss, _ppl(loss), _ppl(loss) / reference, n, found))
        log(f"zero-shot {name}: " + ", ".join(f"{r.length}: {r.ppl:.2f}" for r in rows if r.position == name))

    finetune: dict[str, Any] = {}
    if finetune_steps:
        longest = max(lengths)
        s_ft = scale if scale is not None else max(1.0, longest / trained)
        root = Path(out_dir) if out_dir is not None else run_dir
        for name in positions:
            tuned = copy.deepcopy(model)
            try:
                with_position(tuned, name, **position_options(name, base_options, s_ft, trained))
            except ValueError as e:
                raise AdlError(f"{opt('position')} {name}: {e}") from None
            target = root / f"context-{name}"
            log(f"fine-tune {name}{f' (s={s_ft:g})' if name in SCALED else ''} at {longest} tokens for {finetune_steps} steps -> {target}")
            tuned, result, tc = finetune_at_length(
                tuned, data, recipe, longest, finetune_steps, target, lr=finetune_lr, tokenizer=tokenizer, progress=progress
            )
            # read the tuned model with the position it was tuned with, at every length
            ft_rows_start = len(rows)
            for length in lengths:
                loss, n = perplexity(tuned, data.val, length, span)
                ppl = _ppl(loss)
                rows.append(ContextRow(name, "finetuned", length, s_ft if name in SCALED else None, loss, ppl, ppl / reference, n, passkey_at(tuned, length)))
            log(f"fine-tuned {name}: " + ", ".join(f"{r.length}: {r.ppl:.2f}" for r in rows[ft_rows_start:]))
            finetune[name] = {
                "dir": str(target),
                "steps": finetune_steps,
                "length": longest,
                "scale": s_ft if name in SCALED else None,
                "batch_size": tc.batch_size,
                "lr": tc.lr,
                "train_loss": result.train_loss,
                "wall_s": result.wall_s,
            }
            del tuned

    return ContextReport(
        run_dir=run_dir,
        trained_length=trained,
        run_position=run_position,
        lengths=lengths,
        positions=positions,
        windows=windows,
        reference_ppl=reference,
        rows=rows,
        kv_cache=kv_cache_table(cfg, max(lengths)),
        finetune=finetune,
        passkey_trials=passkey,
    )


def write_json(report: ContextReport, path: str | Path) -> None:
    from adl_cli.engine.checkpoint import atomic_write_text

    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report.to_dict(), indent=1))


def plot_report(report: ContextReport, path) -> None:
    """Perplexity relative to the trained length, by evaluation length, one line per variant."""
    from adl_cli.engine.plots import series_figure

    series: dict[str, list[tuple[float, float]]] = {}
    for r in report.rows:
        series.setdefault(f"{r.position} ({r.mode})", []).append((r.length, r.ratio if math.isfinite(r.ratio) else None))
    series_figure(path, series, title=f"{report.run_dir.name}: trained at {report.trained_length} tokens ({report.run_position})",
                  xlabel="evaluation length (tokens)", ylabel="perplexity / perplexity at the trained length", logx=True, hline=1.0)
