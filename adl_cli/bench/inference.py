"""Decoding speed of a run: adl's ways of decoding side by side with transformers' ``generate``.

Every contender decodes the same greedy prompts (``prompt_len`` tokens, the run's held-out text
where it has one) for ``new_tokens`` tokens, no early stop. A contender is timed generating 1
token (the prefill and one step) and N tokens, in alternating order over ``rounds`` rounds;
medians give

    prefill tokens/s   batch x prompt_len / t(1)
    decode tokens/s    batch x (N - 1) / (t(N) - t(1))         ms/token = (t(N) - t(1)) / (N - 1)

Decoding one step reads every weight once (one row of each embedding table) and each row's
cache, so its speed is bounded by memory reads: bytes a step (those weights, plus the cache at
the average length; a compiled step reads its whole static cache) over the read bandwidth of this machine, measured in the same run on a
buffer of that many bytes with the same threads (a small buffer sits in cache: the bound is then
the cache's). The table gives the share of that bound each contender reaches.

The peer, transformers' GPT2LMHeadModel, runs on the run's weights converted as ``adl export hf``
converts them; a run that is not GPT-2-shaped (U-net skips, untied head, other norms or
positions) is compared through a GPT-2 twin of its shape (same layers, width, heads, vocabulary
and context, random weights) that adl also decodes, so every ratio is on the same weights.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from adl_cli.errors import AdlError, opt

CONTENDERS = ("no-cache", "cache", "compiled", "int8", "int4", "speculative", "lookup", "transformers", "torchao-int8")
BATCH_ONE = ("no-cache", "int4", "speculative", "lookup", "torchao-int8")  # measured at batch 1 only (slow, or one prompt at a time)


@dataclass
class Row:
    contender: str
    batch: int
    prefill_tok_s: float | None
    decode_tok_s: float | None
    ms_per_token: float | None
    memory_mb: float | None  # weights + decode state, computed (CPU); the allocator's measured peak (CUDA)
    bytes_per_step: int | None
    bound_tok_s: float | None
    bound_share: float | None
    vs_peer: float | None  # decode tokens/s over transformers' at this batch
    same_tokens: float | None  # share of greedy tokens equal to adl's cached decoding of the same weights
    weights: str = "run"  # run | twin
    note: str = ""


@dataclass
class InferenceReport:
    run: str
    shape: str
    device: str
    threads: int
    dtype: str
    prompt_len: int
    new_tokens: int
    rounds: int
    peer_weights: str
    rows: list[Row] = field(default_factory=list)
    bandwidth_gb_s: dict[str, float] = field(default_factory=dict)  # buffer MB -> GB/s
    compile_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d


def parse_batches(text: str) -> list[int]:
    try:
        batches = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise AdlError(f"{opt('batch')} takes whole numbers separated by commas, got '{text}'") from None
    if not batches or batches[0] < 1:
        raise AdlError(f"{opt('batch')} takes batch sizes >= 1, got '{text}'")
    return batches


def parse_contenders(text: str | None) -> list[str]:
    from adl_cli.errors import closest

    if text is None:
        return list(CONTENDERS)
    names = [x.strip() for x in text.split(",") if x.strip()]
    for n in names:
        if n not in CONTENDERS:
            raise AdlError(f"{opt('only')}: unknown contender '{n}'{closest(n, CONTENDERS)}; choose from {', '.join(CONTENDERS)}")
    return names


def _storage(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data (a tensor subclass, e.g. torchao's, holds several)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        return [x for name in t.__tensor_flatten__()[0] for x in _storage(getattr(t, name))]
    return [t]


def _unique_bytes(tensors, skip: set[int] = frozenset()) -> int:
    seen, total = set(), 0
    for t in tensors:
        for x in _storage(t):
            if x.data_ptr() in seen or x.data_ptr() in skip:
                continue
            seen.add(x.data_ptr())
            total += x.numel() * x.element_size()
    return total


def weight_bytes(model) -> int:
    return _unique_bytes(list(model.parameters()) + list(model.buffers()))


def step_weight_bytes(model) -> int:
    """Weight bytes one decoding step reads: everything but the embedding tables, of which a step
    reads one row each (a table that is also the output head is read whole, as the head)."""
    from torch import nn

    tables = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {x.data_ptr() for m in model.modules() if isinstance(m, nn.Linear) for x in _storage(m.weight)}
    return _unique_bytes(list(model.parameters()) + list(model.buffers()), skip=tables - heads)


def state_bytes_per_position(model, batch: int) -> float:
    state = model.setup_cache(batch, 8, device="meta")
    return state.nbytes() / 8


def read_bandwidth(nbytes: int, device: torch.device, repeats: int = 7) -> float:
    """Bytes per second of summing a float32 buffer of ``nbytes`` (the threads torch uses)."""
    buf = torch.ones(max(nbytes // 4, 1024), device=device)
    for _ in range(2):
        buf.sum()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        buf.sum()
        _sync(device)
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def twin_config(cfg):
    """A GPT-2-shaped config with the run's layers, width, heads, vocabulary and context."""
    from adl_cli.models.gpt import GPTConfig

    return GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)


def transformers_model(model):
    """transformers' GPT2LMHeadModel holding ``model``'s weights, converted as adl export hf converts them."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise AdlError("the transformers peer needs transformers (pip install transformers), or leave it out with --only") from None
    from adl_cli.models.hf_gpt2 import adl_to_hf, adl_to_hf_config

    cfg = model.config
    hf_cfg = {k: v for k, v in adl_to_hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version")}
    hf = GPT2LMHeadModel(GPT2Config(**hf_cfg))
    hf.load_state_dict(adl_to_hf(dict(model.state_dict()), cfg), strict=False)  # the head is tied to wte
    hf.tie_weights()
    return hf.eval().to(next(model.parameters()).device)


def decoders(model, names, *, twin=None, draft=None, lookup: int = 3, lookahead: int = 4, peer=None) -> dict[str, Callable]:
    """Name -> decode(prompts (B, P) tensor, n) -> new tokens (B, n) as lists, for the contenders ``names``."""
    from adl_cli.inference.engine import generate_batch
    from adl_cli.inference.quant import quantize_model
    from adl_cli.inference.sampling import SamplingParams
    from adl_cli.inference.speculative import speculative_generate

    greedy = SamplingParams(temperature=0.0)

    def engine(m, compile=False):
        return lambda idx, n: [c.tokens for c in generate_batch(m, idx.tolist(), n, greedy, compile=compile)]

    def no_cache(idx, n):
        seq = idx
        with torch.no_grad():
            for _ in range(n):
                seq = torch.cat((seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)), 1)
        return seq[:, idx.shape[1]:].tolist()

    def speculative(proposer):
        def run(idx, n):
            return [speculative_generate(model, idx[i:i + 1], n, params=greedy, lookahead=lookahead, **proposer)[0][0, idx.shape[1]:].tolist()
                    for i in range(idx.shape[0])]
        return run

    def hf_generate(idx, n):
        with torch.no_grad():
            out = peer.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                use_cache=True, pad_token_id=0)
        return out[:, idx.shape[1]:].tolist()

    out: dict[str, Callable] = {"no-cache": no_cache, "cache": engine(model), "compiled": engine(model, compile=True)}
    for scheme in ("int8", "int4"):
        if scheme in names:
            q = copy.deepcopy(model)
            quantize_model(q, scheme)
            out[scheme] = engine(q)
            out[f"{scheme}:model"] = q
    if "torchao-int8" in names:
        try:  # the peer of weight-only int8: torchao's, where it is installed
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            pass
        else:
            t = copy.deepcopy(model)
            quantize_(t, Int8WeightOnlyConfig())
            out["torchao-int8"] = engine(t)
            out["torchao-int8:model"] = t
    if draft is not None:
        out["speculative"] = speculative({"draft": draft})
    out["lookup"] = speculative({"lookup_ngram": lookup})
    if peer is not None:
        out["transformers"] = hf_generate
        if twin is not None:
            out["cache (twin)"] = engine(twin)
    return out


def bench_inference(run_dir, *, batches=(1,), prompt_len: int = 32, new_tokens: int = 128, rounds: int = 3, only=None, draft_dir=None,
                    lookup: int = 3, lookahead: int = 4, device: str = "cpu", log=lambda msg: None) -> InferenceReport:
    from adl_cli.runs import load_run

    if prompt_len < 1 or new_tokens < 2 or rounds < 1:
        raise AdlError(f"{opt('prompt_len')} must be >= 1, {opt('new_tokens')} >= 2 and {opt('rounds')} >= 1")
    names = parse_contenders(only) if isinstance(only, str) or only is None else list(only)
    dev = torch.device(device)
    run = load_run(run_dir, device=dev)
    from adl_cli.quantization.store import read_quantization

    quantized = read_quantization(run.path)
    model = (run.model if quantized else run.model.float()).eval()  # a quantized run keeps its stored dtypes
    cfg = model.config
    if prompt_len >= cfg.block_size:
        raise AdlError(f"{opt('prompt_len')} ({prompt_len}) must be shorter than the run's context ({cfg.block_size})")
    notes = []
    if quantized:
        dropped = [c for c in names if c in ("int8", "int4", "torchao-int8", "transformers")]
        names = [c for c in names if c not in dropped]
        if dropped:
            notes.append(f"a quantized run ({quantized['method']}, adl quantize): its own layers are timed; {', '.join(dropped)} left out "
                         "(they quantize or convert a float run)")
    n = min(new_tokens, cfg.block_size - prompt_len)
    if n < new_tokens:
        notes.append(f"new tokens capped at {n}: prompt + new tokens stay within the context of {cfg.block_size} (the peer cannot go past it)")
    draft = None
    if "speculative" in names:
        if draft_dir is None:
            names.remove("speculative")
            notes.append("no --draft run: speculative decoding left out")
        else:
            from adl_cli.methods.generate import load_draft

            draft = load_draft(draft_dir, run, device=dev).float().eval()
    peer = twin = None
    peer_weights = "none"
    if "transformers" in names:
        from adl_cli.models.hf_gpt2 import check_exportable

        try:
            check_exportable(cfg)
            peer, peer_weights = transformers_model(model), "the run's own weights (converted as adl export hf does)"
        except AdlError as why:
            from adl_cli.models.gpt import GPT

            torch.manual_seed(0)
            twin = GPT(twin_config(cfg)).to(dev).eval()
            peer = transformers_model(twin)
            peer_weights = f"a GPT-2 twin of the run's shape with random weights ({why})"
    fns = decoders(model, names, twin=twin, draft=draft, lookup=lookup, lookahead=lookahead, peer=peer)
    if "torchao-int8" in names and "torchao-int8" not in fns:
        notes.append("torchao is not installed (pip install torchao): its int8 weight-only row left out")
    order = [c for c in names if c in fns] + (["cache (twin)"] if twin is not None else [])
    threads = torch.get_num_threads()
    report = InferenceReport(str(run_dir), f"{cfg.n_layer} x {cfg.n_embd}, {cfg.n_head} heads, vocab {cfg.vocab_size}, context {cfg.block_size}",
                             str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev), threads, "fp32", prompt_len, n, rounds,
                             peer_weights, notes=notes)
    for b in batches:
        prompts = _prompts(run, b, prompt_len, cfg.vocab_size, dev)
        here = [c for c in order if b == 1 or c not in BATCH_ONE]
        if "compiled" in here:  # compile outside the timing (the graph is made once per shape)
            t = time.perf_counter()
            fns["compiled"](prompts, n)
            report.compile_s = max(report.compile_s or 0.0, time.perf_counter() - t)
        for c in here:
            fns[c](prompts, n if c == "compiled" else 2)  # warm-up (a compiled step's graph is made for its cache length)
        outputs, t1, tn, peaks = {}, {c: [] for c in here}, {c: [] for c in here}, {}
        for r in range(rounds):
            for c in (here if r % 2 == 0 else list(reversed(here))):
                log(f"batch {b}, round {r + 1}/{rounds}: {c}")
                _sync(dev)
                t = time.perf_counter()
                fns[c](prompts, 1)
                _sync(dev)
                t1[c].append(time.perf_counter() - t)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t = time.perf_counter()
                outputs[c] = fns[c](prompts, n)
                _sync(dev)
                tn[c].append(time.perf_counter() - t)
                if dev.type == "cuda":
                    peaks[c] = max(peaks.get(c, 0), torch.cuda.max_memory_allocated(dev))
        for c in here:
            row = _row(c, b, prompts, n, statistics.median(t1[c]), statistics.median(tn[c]), outputs, fns, model, twin, dev, report)
            if c in peaks:  # on a GPU: the measured peak of the device's allocator (everything held, transformers' too)
                row.memory_mb = peaks[c] / 1e6
            report.rows.append(row)
    peer_rows = {r.batch: r for r in report.rows if r.contender == "transformers"}
    for r in report.rows:
        p = peer_rows.get(r.batch)
        if p is not None and r.decode_tok_s and p.decode_tok_s:
            r.vs_peer = r.decode_tok_s / p.decode_tok_s
    return report


def _prompts(run, batch: int, length: int, vocab: int, dev) -> torch.Tensor:
    """``batch`` windows of the run's held-out text (random ids for a run without a recipe)."""
    from pathlib import Path

    g = torch.Generator().manual_seed(batch)
    if (Path(run.path) / "recipe.toml").exists() and run.tokenizer is not None:
        try:
            from adl_cli.methods.evaluate import evaluation_tokens

            tokens, _ = evaluation_tokens(run, None, "val")
            if len(tokens) > length + 1:
                starts = torch.randint(0, len(tokens) - length, (batch,), generator=g).tolist()
                return torch.tensor([list(tokens[s:s + length]) for s in starts], dtype=torch.long, device=dev)
        except AdlError:
            pass
    return torch.randint(0, vocab, (batch, length), generator=g).to(dev)


def _row(c, b, prompts, n, t1, tn, outputs, fns, model, twin, dev, report) -> Row:
    P = prompts.shape[1]
    decode_s = max(tn - t1, 1e-9)
    weights_of = {"int8": fns.get("int8:model"), "int4": fns.get("int4:model"), "torchao-int8": fns.get("torchao-int8:model"),
                  "transformers": twin or model, "cache (twin)": twin}
    m = weights_of.get(c) or model
    reference = outputs.get("cache (twin)" if twin is not None and c in ("transformers", "cache (twin)") else "cache")
    same = None
    if reference is not None and c in outputs:
        pairs = [(x, y) for xs, ys in zip(outputs[c], reference) for x, y in zip(xs, ys)]
        same = sum(x == y for x, y in pairs) / max(1, len(pairs))
    per_pos = state_bytes_per_position(m, b)
    cache_len = min(-(-(P + n) // 128) * 128, model.config.block_size + model.config.block_size // 4) if c == "compiled" else P + n / 2  # a static cache is read whole
    step_bytes = None if c in ("no-cache", "speculative", "lookup") else int(step_weight_bytes(m) + per_pos * cache_len)
    bound = share = None
    if step_bytes is not None:
        key = f"{step_bytes / 1e6:.1f}"
        if key not in report.bandwidth_gb_s:
            report.bandwidth_gb_s[key] = read_bandwidth(step_bytes, dev) / 1e9
        bound = b / (step_bytes / (report.bandwidth_gb_s[key] * 1e9))
    decode = b * (n - 1) / decode_s
    if bound:
        share = decode / bound
    memory = (weight_bytes(m) + per_pos * (P + n)) / 1e6
    note = {"torchao-int8": "torchao's Int8WeightOnlyConfig", "speculative": "draft run, batch 1", "lookup": "prompt n-grams, batch 1", "compiled": "torch.compile, static cache",
            "cache (twin)": "adl on the peer's weights"}.get(c, "")
    return Row(c, b, b * P / max(t1, 1e-9), decode, decode_s / (n - 1) * 1e3, memory, step_bytes, bound, share, None, same,
               "twin" if c in ("transformers", "cache (twin)") and twin is not None else "run", note)
