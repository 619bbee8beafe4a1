"""adl bench-quantize: every quantization method on one run, side by side with the float model.

For each contender (fp32, adl's methods, torchao's CPU methods where torchao is installed):

    bits / param  stored bits of the whole model (embeddings, norms, scales, zero points included)
                  over the float model's parameters; file MB: its model.safetensors
    loss, ppl, bpb  on the run's held-out split (eval.py's windows: every token once), or on ``data``
                  (any corpus spec); calibration reads the run's training split or ``calib_data``
    KL            mean over the same tokens of KL(p_fp32 || p_quantized), nats (llama.cpp's figure)
    exact match   greedy answers to a task's held-out problems (``task``), with a Wilson interval
    decode tok/s  greedy decoding at batch 1, the contenders alternated, median over rounds

Every model scores each batch of windows in turn, so the float model's logits are computed once.
``outliers``: the float model first gets function-preserving outlier channels
(quantization/outliers.py), the case LLM.int8(), SmoothQuant and AWQ are built for.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adl_cli.errors import AdlError, opt
from adl_cli.quantization.methods import METHODS, QuantOptions

PEERS = ("torchao-int8", "torchao-int4", "torchao-w8a8")
DEFAULT = ("int8", "int4", "nf4", "nf4-adl", "fp4", "llm-int8", "gptq", "awq", "w8a8", "smoothquant", "hqq", *PEERS)


@dataclass
class Row:
    name: str
    by: str  # adl, bitsandbytes, torchao, reference
    bits_per_parameter: float = 32.0
    file_mb: float = 0.0
    quantize_s: float = 0.0
    loss: float = 0.0
    perplexity: float = 0.0
    bits_per_byte: float = 0.0
    kl: float = 0.0
    exact: float | None = None
    exact_ci95: list[float] | None = None
    decode_tok_s: float = 0.0


@dataclass
class BenchQuantizeReport:
    run: str
    tokens: int
    text: str
    calibration: str
    outliers: dict | None
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    decode: dict = field(default_factory=dict)
    task: dict | None = None

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "rows": [asdict(r) for r in self.rows]}


def _by(name: str) -> str:
    return "torchao" if name.startswith("torchao") else "bitsandbytes" if name in ("nf4", "fp4", "llm-int8") else "adl"


def _torchao(model, name: str):
    """torchao's CPU methods as peers; None (with the reason) where they do not run here."""
    try:
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                          quantize_)
    except ImportError:
        return None, "torchao is not installed"
    m = copy.deepcopy(model)
    try:
        if name == "torchao-int8":
            quantize_(m, Int8WeightOnlyConfig())
        elif name == "torchao-w8a8":
            quantize_(m, Int8DynamicActivationInt8WeightConfig())
        else:
            try:
                from torchao.dtypes import Int4CPULayout
            except ImportError:
                return None, "this torchao has no CPU int4 layout (torchao.dtypes.Int4CPULayout)"
            m = m.to(torch.bfloat16)
            quantize_(m, Int4WeightOnlyConfig(group_size=128, layout=Int4CPULayout(), version=1))
    except Exception as e:  # a peer that cannot run on this host/version is reported, not fatal
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return m, ""


def _tensor_bits(t: torch.Tensor) -> int:
    """Bits a tensor stores; a tensor subclass (torchao's) counts its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bits(getattr(t, n)) for n in names)
    return t.numel() * t.element_size() * 8


def _stored_bits(model) -> int:
    """Bits of the model's saved state (persistent tensors; shared ones once)."""
    seen = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(_tensor_bits(t) for t in seen.values())


def _file_mb(model) -> float:
    """Size of the model's model.safetensors (torchao's tensor subclasses do not serialize to
    safetensors: their stored bytes instead)."""
    from adl_cli.engine.checkpoint import save_weights

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        try:
            save_weights(model, path)
        except Exception:
            return _stored_bits(model) / 8 / 1e6
        return path.stat().st_size / 1e6


@torch.no_grad()
def score(models: dict[str, torch.nn.Module], reference: torch.nn.Module, tokens, block: int, batch_size: int = 8) -> dict[str, dict]:
    """Loss and KL to ``reference`` of every model on the same windows (see the module's docstring)."""
    from adl_cli.data.tokens import split_windows

    sums = {name: [0.0, 0.0] for name in models}
    count = 0
    for x, y in split_windows(tokens, block, batch_size):
        device = next(reference.parameters()).device
        x, y = x.to(device), y.to(device)
        keep = y != -100
        ref = F.log_softmax(reference(x)[0].float()[keep], -1)
        count += int(keep.sum())
        for name, m in models.items():
            logp = F.log_softmax(m(x)[0].float()[keep], -1)
            sums[name][0] += float(F.nll_loss(logp, y[keep], reduction="sum"))
            sums[name][1] += float((ref.exp() * (ref - logp)).sum())
    return {name: {"loss": s[0] / count, "kl": s[1] / count} for name, s in sums.items()}


def bench_quantize(run_dir: Path, methods: list[str], *, data: str | None = None, calib_data: str | None = None, max_tokens: int | None = 65536, task: str | None = None, examples: int = 200,
                   new_tokens: int = 64, rounds: int = 3, group_size: int | None = None, head: bool = False, outliers: int = 0, outlier_scale: float = 30.0, calib_samples: int = 128,
                   seed: int = 0, device: str = "cpu", log=lambda msg: None) -> BenchQuantizeReport:
    from adl_cli.bench.timing import alternating_medians
    from adl_cli.inference.engine import generate_batch
    from adl_cli.inference.sampling import SamplingParams
    from adl_cli.methods.evaluate import evaluation_tokens
    from adl_cli.methods.quantize import calibration_windows, source_run
    from adl_cli.quantization.apply import quantize_model

    for name in methods:
        if name != "fp32" and name not in PEERS:
            METHODS.get(name)
    if max_tokens is not None and max_tokens < 2:
        raise AdlError(f"{opt('max_tokens')} must be >= 2, got {max_tokens}")
    if rounds < 1 or new_tokens < 1:
        raise AdlError(f"{opt('rounds')} and {opt('new_tokens')} must be >= 1")
    run = source_run(run_dir, device=device)
    ref = run.model
    n_params = sum(p.numel() for p in {id(p): p for p in ref.parameters()}.values())
    if data is None and not (Path(run.path) / "recipe.toml").exists():
        raise AdlError(f"{run.path} has no recipe.toml (it was not trained by adl pretrain): name a text to score with {opt('data')}")
    tokens, what = evaluation_tokens(run, data, "val")
    tokens = tokens[:max_tokens] if max_tokens else tokens
    needs_calib = any(n in METHODS and METHODS.get(n).stats for n in methods)
    windows, calibration = calibration_windows(run, samples=calib_samples, seed=seed, data=calib_data) if needs_calib else (None, "none")
    injected = None
    if outliers:
        from adl_cli.quantization.outliers import inject_outliers

        sample = torch.as_tensor(tokens[: min(len(tokens), run.config.block_size)].astype("int64"))[None].to(device)
        before = ref(sample)[0]
        k = inject_outliers(ref, sample, n=outliers, scale=outlier_scale, seed=seed)
        change = float((ref(sample)[0] - before).abs().max() / before.abs().max())
        injected = {"channels": outliers, "scale": outlier_scale, "norms": k, "max_logit_change": change}
    report = BenchQuantizeReport(str(run_dir), len(tokens), what, calibration, injected)
    models, rows = {}, {"fp32": Row("fp32", "reference", _stored_bits(ref) / n_params, _file_mb(ref))}
    for name in [m for m in methods if m != "fp32"]:
        log(f"quantizing: {name}")
        t0 = time.perf_counter()
        if name in PEERS:
            m, why = _torchao(ref, name)
            if m is None:
                report.skipped[name] = why
                continue
        else:
            m = copy.deepcopy(ref)
            group = group_size if METHODS.get(name).default_group else None  # row-wise methods keep their rows
            quantize_model(m, name, QuantOptions(group_size=group, head=head, calib_samples=calib_samples, seed=seed), windows)
        rows[name] = Row(name, _by(name), _stored_bits(m) / n_params, _file_mb(m), time.perf_counter() - t0)
        models[name] = m.eval()
    log(f"scoring {len(tokens):,} held-out tokens")
    scores = score({"fp32": ref, **models}, ref, tokens, min(run.config.block_size, len(tokens) - 1))
    bpt = run.tokenizer.token_bytes(tokens[1:]) / max(1, len(tokens) - 1)
    for name, s in scores.items():
        r = rows[name]
        r.loss, r.kl = s["loss"], max(0.0, s["kl"])
        r.perplexity, r.bits_per_byte = math.exp(min(r.loss, 700.0)), r.loss / math.log(2) / bpt
    if task is not None:
        _exact(report, rows, {"fp32": ref, **models}, run, task, examples)
    log("timing decode")
    greedy = SamplingParams(temperature=0.0)
    prompt = [list(map(int, tokens[:32]))]
    contenders = {name: (lambda m=m: generate_batch(m, prompt, new_tokens, greedy)) for name, m in {"fp32": ref, **models}.items()}
    seconds = alternating_medians(contenders, rounds=rounds)
    for name, s in seconds.items():
        rows[name].decode_tok_s = new_tokens / s
    report.decode = {"device": device, "batch": 1, "prompt": 32, "new_tokens": new_tokens, "rounds": rounds, "threads": torch.get_num_threads()}
    report.rows = [rows[n] for n in ["fp32", *models]]
    return report


def _exact(report, rows, models, run, task_name, examples):
    from adl_cli.data.tasks import make_task, split_problems
    from adl_cli.methods.exact_match import exact_match
    from adl_cli.methods.sft import task_settings

    seed, options = task_settings(run.path)
    task = make_task(task_name, **options)
    problems = split_problems(task, examples, held_out=True, seed=seed)
    for name, m in models.items():
        s = exact_match(m, run.tokenizer, task, problems)
        rows[name].exact, rows[name].exact_ci95 = s.accuracy, list(s.interval)
    report.task = {"name": task_name, "examples": len(problems), "split_seed": seed}
