"""Attention benchmark: time, peak memory and error of each implementation by sequence length.

For every sequence length the implementations run on the same random q, k, v
(B, H, T, D). Each repeat runs every implementation once, alternating, so machine noise
hits all of them alike; the figures are medians over repeats, after one warm-up call.

- fwd_ms: forward under ``torch.no_grad`` (inference cost);
  fwdbwd_ms: forward with autograd + backward of a fixed random output gradient.
- peak_mb: the most memory the call holds at once beyond its inputs. CUDA:
  ``torch.cuda.max_memory_allocated`` minus what was allocated before. CPU: torch has
  no allocator statistics, so a ``TorchDispatchMode`` records every tensor storage an
  operator creates (engine/memory.py: sizes from the storage, frees from a weakref finalizer) and
  keeps the high-water mark of the live total. Everything autograd saves, every
  temporary and the gradients count; scratch buffers a fused C++ kernel allocates
  internally (e.g. SDPA's per-thread tiles, a few MB) are not seen.
- max_err: max |out - reference| where the reference is ``naive`` in float32 on the
  same inputs (with the same window for ``window``); skipped, and said so, where
  naive would materialise more than ``ref_limit_mb`` of scores.
- ratio_sdpa: this time / torch SDPA's time at the same length (fwd+bwd when the
  backward is measured, else fwd).

Special rows: ``ring/P=N`` time and hold memory of ONE rank of an N-rank ring (its
query shard and the key/value blocks passing through, communication excluded), the
error from the full simulated ring; ``tree/P=N`` is a decoding step (one new query
against T cached keys in N shards), its ratio against SDPA on the same decoding step;
``mla`` is the whole multi-head latent attention block (its projections included,
C = H D), error = absorbed vs unabsorbed form.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adl_cli.engine.memory import peak_bytes
from adl_cli.errors import AdlError, opt, unknown

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_IMPLS = ("naive", "sdpa", "flash", "window", "ring", "tree")
SPECIAL = ("ring", "tree", "mla")


def available_impls() -> list[str]:
    from adl_cli.nn.attention import ATTENTION, ATTENTION_BLOCKS

    names = set(ATTENTION.names()) | set(SPECIAL)
    if "mla" not in ATTENTION_BLOCKS:
        names.discard("mla")
    return sorted(names)


def default_impls() -> list[str]:
    names = list(DEFAULT_IMPLS)
    if "mla" in available_impls():
        names.append("mla")
    return names


def parse_impls(text: str | list[str]) -> list[str]:
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not items:
        raise AdlError(f"{opt('impl')} names no implementation")
    choices = available_impls()
    for name in items:
        if name not in choices:
            raise unknown("attention implementation", name, choices)
    return list(dict.fromkeys(items))


def parse_seqs(text: str | list[int]) -> list[int]:
    items = text.split(",") if isinstance(text, str) else list(text)
    seqs = []
    for item in items:
        try:
            n = int(str(item).strip())
        except ValueError:
            raise AdlError(f"{opt('lengths')} takes positive integers separated by commas, got '{item}'") from None
        if n <= 0:
            raise AdlError(f"{opt('lengths')} takes positive integers, got {n}")
        seqs.append(n)
    if not seqs:
        raise AdlError(f"{opt('lengths')} names no sequence length")
    return seqs


PRECISION_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the recipes' train.precision spelling


def canonical_dtype(name: str) -> str:
    """'fp32' (as recipes say) or 'float32' -> 'float32'; unknown names are an AdlError."""
    name = PRECISION_NAMES.get(name, name)
    if name not in DTYPES:
        raise unknown("dtype", name, [*DTYPES, *PRECISION_NAMES])
    return name


def parse_dtype(name: str) -> torch.dtype:
    return DTYPES[canonical_dtype(name)]



# ------------------------------------------------------------------------------------ cases


@dataclass
class _Case:
    impl: str
    fwd: Callable[[], torch.Tensor] | None
    fwdbwd: Callable[[], object] | None
    error: Callable[[], float | None]
    backend: str | None = None
    note: str = ""
    compare: str | None = None  # key of the SDPA timing this row is compared with
    extra: dict | None = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _grad_call(fn, inputs, dout):
    def run():
        xs = [x.detach().requires_grad_() for x in inputs]
        out = fn(*xs)
        out.backward(dout)
        return out

    return run


def _kernel_cases(name, q, k, v, dout, ref, ref_window, *, causal, window):
    from adl_cli.nn.attention import ATTENTION

    kernel = ATTENTION.get(name)
    kw = {"causal": causal}
    note, backend = "", None
    if name == "window":
        kw["window"] = window
        note = f"window {window}"
    if name == "s2":
        kw["group"] = max(2, q.shape[2] // 4)
        note = f"group {kw['group']} (T/4); no error column: S2 is sparse by design"
    if name == "sdpa":
        from adl_cli.nn.attention.sdpa import sdpa_backend

        backend = sdpa_backend(q, k, v, causal=causal)
    if name in ("flash", "window"):
        from adl_cli.nn.attention.flash import _use_triton

        backend = "triton" if _use_triton(q, v, None, "auto") else "torch"
    call = lambda q_, k_, v_: kernel(q_, k_, v_, **kw)  # noqa: E731
    reference = ref_window if name == "window" else ref

    def error():
        if reference is None or name == "s2":
            return None
        with torch.no_grad():
            return (call(q, k, v).float() - reference).abs().max().item()

    def fwd():
        with torch.no_grad():
            return call(q, k, v)

    return _Case(name, fwd, _grad_call(call, (q, k, v), dout), error, backend=backend, note=note, compare="sdpa")


def _ring_cases(q, k, v, dout, ref, *, causal, worlds):
    from adl_cli.nn.attention.ring import ring_attention, ring_rank, shard_bytes, shard_sequence

    T = q.shape[2]
    cases = []
    for world in worlds:
        if T % (2 * world if causal else world):
            continue
        shards = [[shard_sequence(x, r, world, causal=causal).contiguous() for r in range(world)] for x in (q, k, v)]
        q0, d0 = shards[0][0], shard_sequence(dout, 0, world, causal=causal).contiguous()

        def fwd(shards=shards, q0=q0):
            with torch.no_grad():
                return ring_rank(q0, shards[1], shards[2], causal=causal)

        def fwdbwd(shards=shards, q0=q0, d0=d0):
            qq = q0.detach().requires_grad_()
            kk = [s.detach().requires_grad_() for s in shards[1]]  # grads of the rank's own block
            vv = [s.detach().requires_grad_() for s in shards[2]]
            ring_rank(qq, kk, vv, causal=causal).backward(d0)

        def error(world=world):
            if ref is None:
                return None
            with torch.no_grad():
                return (ring_attention(q, k, v, world=world, causal=causal).float() - ref).abs().max().item()

        sizes = shard_bytes(T, world, batch=q.shape[0], heads=q.shape[1], head_dim=q.shape[3], dtype=q.dtype,
                            kv_heads=k.shape[1])
        cases.append(_Case(f"ring/P={world}", fwd, fwdbwd, error, note=f"one rank of {world}, communication excluded",
                           compare="sdpa", extra={"shard_mb": round(sum(sizes.values()) / 2**20, 2)}))
    return cases


def _tree_case(q, k, v, *, causal, shards):
    from adl_cli.nn.attention.sdpa import sdpa_attention
    from adl_cli.nn.attention.tree import tree_attention

    q1 = q[:, :, -1:].contiguous()

    def fwd():
        with torch.no_grad():
            return tree_attention(q1, k, v, shards=shards, causal=causal)

    def error():
        with torch.no_grad():
            ref = sdpa_attention(q1.float(), k.float(), v.float(), causal=causal)
            return (fwd().float() - ref).abs().max().item()

    return _Case(f"tree/P={shards}", fwd, None, error, note="decoding step: 1 query vs T cached keys; vs sdpa on the same step",
                 compare="sdpa-decode")


def _mla_case(q, dout, *, dtype):
    from adl_cli.models.gpt import GPTConfig
    from adl_cli.nn.attention import ATTENTION_BLOCKS
    from adl_cli.nn.position import POSITIONS

    B, H, T, D = q.shape
    C = H * D
    cfg = GPTConfig(vocab_size=8, block_size=T, n_layer=1, n_head=H, n_embd=C, attention="mla", position="none")
    torch.manual_seed(0)
    block = ATTENTION_BLOCKS.get("mla")(cfg).to(device=q.device, dtype=dtype)
    position = POSITIONS.get("none")(n_embd=C, head_dim=D, n_head=H, block_size=T)
    x = q.transpose(1, 2).reshape(B, T, C).contiguous()
    pos = torch.arange(T, device=q.device)
    dy = dout.transpose(1, 2).reshape(B, T, C)

    def fwd():
        with torch.no_grad():
            return block(x, pos, position, absorb=False)

    def fwdbwd():
        block.zero_grad(set_to_none=True)
        block(x.detach().requires_grad_(), pos, position, absorb=False).backward(dy)

    def error():
        with torch.no_grad():
            return (block(x, pos, position, absorb=True).float() - fwd().float()).abs().max().item()

    return _Case("mla", fwd, fwdbwd, error, note=f"whole MLA block with projections (C={C}); err: absorbed vs unabsorbed",
                 compare="sdpa")


# ------------------------------------------------------------------------------------- run


def run_attention_bench(
    impls, seqs, *, batch=1, heads=8, head_dim=64, causal=True, backward=True, dtype="float32", repeats=3,
    window=256, worlds=(2, 4, 8), tree_shards=4, device=None, ref_limit_mb=1024, seed=0,
    on_seq: Callable[[int, list[dict]], None] | None = None,
) -> list[dict]:
    """Measure every implementation at every length; returns one dict per (impl, seq)."""
    impls = parse_impls(impls)
    seqs = parse_seqs(seqs)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    for name, value in (("batch", batch), ("heads", heads), ("head-dim", head_dim), ("repeats", repeats)):
        if value < 1:
            raise AdlError(f"{opt(name)} must be >= 1, got {value}")
    if window is not None and window < 1:
        raise AdlError(f"{opt('window')} must be >= 1, got {window}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[dict] = []
    for T in seqs:
        seq_rows = _bench_one(impls, T, batch=batch, heads=heads, head_dim=head_dim, causal=causal,
                              backward=backward, dtype=torch_dtype, repeats=repeats, window=window, worlds=worlds,
                              tree_shards=tree_shards, device=device, ref_limit_mb=ref_limit_mb, seed=seed)
        rows.extend(seq_rows)
        if on_seq is not None:
            on_seq(T, seq_rows)
    return rows


def _bench_one(impls, T, *, batch, heads, head_dim, causal, backward, dtype, repeats, window, worlds,
               tree_shards, device, ref_limit_mb, seed):
    from adl_cli.nn.attention.naive import naive_attention
    from adl_cli.nn.attention.sdpa import sdpa_attention

    g = torch.Generator(device="cpu").manual_seed(seed + T)
    q, k, v, dout = (torch.randn(batch, heads, T, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    scores_mb = batch * heads * T * T * 4 / 2**20
    ref = ref_window = None
    ref_ok = scores_mb <= ref_limit_mb
    if ref_ok:
        with torch.no_grad():
            qf, kf, vf = q.float(), k.float(), v.float()
            if any(n in impls for n in ("naive", "sdpa", "flash", "s2", "ring")):
                ref = naive_attention(qf, kf, vf, causal=causal)
            if "window" in impls:
                ref_window = naive_attention(qf, kf, vf, causal=causal, window=window)

    cases: list[_Case] = []
    skipped: list[dict] = []
    for name in impls:
        if name == "naive" and not ref_ok:
            skipped.append(_row("naive", T, note=f"skipped: would materialise {scores_mb:,.0f} MB of scores"))
        elif name == "ring":
            ring = _ring_cases(q, k, v, dout, ref, causal=causal, worlds=worlds)
            cases.extend(ring)
            if not ring:
                skipped.append(_row("ring", T, note=f"skipped: {T} not divisible into 2P chunks for P in {tuple(worlds)}"))
        elif name == "tree":
            cases.append(_tree_case(q, k, v, causal=causal, shards=tree_shards))
        elif name == "mla":
            cases.append(_mla_case(q, dout, dtype=dtype))
        else:
            cases.append(_kernel_cases(name, q, k, v, dout, ref, ref_window, causal=causal, window=window))

    # hidden SDPA timings that rows are compared with
    sdpa_call = lambda q_, k_, v_: sdpa_attention(q_, k_, v_, causal=causal)  # noqa: E731
    q1 = q[:, :, -1:].contiguous()

    def sdpa_fwd():
        with torch.no_grad():
            return sdpa_call(q, k, v)

    def sdpa_decode():
        with torch.no_grad():
            return sdpa_call(q1, k, v)

    refs = {"sdpa": _Case("sdpa", sdpa_fwd, _grad_call(sdpa_call, (q, k, v), dout), lambda: None)}
    if any(c.compare == "sdpa-decode" for c in cases):
        refs["sdpa-decode"] = _Case("sdpa-decode", sdpa_decode, None, lambda: None)
    everyone = cases + [c for key, c in refs.items() if not any(x.impl == key for x in cases)]

    times = {id(c): {"fwd": [], "fwdbwd": []} for c in everyone}
    for c in everyone:  # warm-up
        c.fwd()
        if backward and c.fwdbwd is not None:
            c.fwdbwd()
    for _ in range(repeats):
        for c in everyone:
            times[id(c)]["fwd"].append(_timed(c.fwd, device))
        if backward:
            for c in everyone:
                if c.fwdbwd is not None:
                    times[id(c)]["fwdbwd"].append(_timed(c.fwdbwd, device))

    def median(c, kind):
        xs = times[id(c)][kind]
        return statistics.median(xs) if xs else None

    by_name = {c.impl: c for c in everyone}
    rows = []
    for c in cases:
        fwd_ms, fwdbwd_ms = median(c, "fwd"), median(c, "fwdbwd")
        run_mem = c.fwdbwd if (backward and c.fwdbwd is not None) else c.fwd
        peak = peak_bytes(run_mem, device) / 2**20
        ref_case = by_name.get(c.compare) if c.compare else None
        ratio = None
        if ref_case is not None:
            kind = "fwdbwd" if backward and c.fwdbwd is not None else "fwd"
            mine, base = median(c, kind), median(ref_case, kind)
            ratio = mine / base if mine and base else None
        err = c.error()
        note = c.note
        if err is None and not ref_ok and c.impl not in ("mla",) and not c.impl.startswith("tree"):
            note = (note + "; " if note else "") + f"no reference: naive would materialise {scores_mb:,.0f} MB"
        row = _row(c.impl, T, fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms, peak_mb=peak, max_err=err, ratio_sdpa=ratio,
                   backend=c.backend, note=note)
        if c.extra:
            row.update(c.extra)
        rows.append(row)
    naive_row = next((r for r in rows if r["impl"] == "naive"), None)
    for r in rows:
        comparable = naive_row and naive_row["peak_mb"] and r["peak_mb"] is not None and not r["impl"].startswith("tree")
        r["mem_vs_naive"] = round(r["peak_mb"] / naive_row["peak_mb"], 4) if comparable else None
    order = {name: i for i, name in enumerate(impls)}
    rows = rows + skipped
    rows.sort(key=lambda r: order.get(r["impl"].split("/")[0], len(order)))
    for r in rows:
        r.update(batch=int(q.shape[0]), heads=int(q.shape[1]), head_dim=int(q.shape[3]), causal=causal,
                 dtype=str(dtype).replace("torch.", ""), device=device.type, repeats=repeats,
                 threads=torch.get_num_threads())
    return rows


def _row(impl, seq, *, fwd_ms=None, fwdbwd_ms=None, peak_mb=None, max_err=None, ratio_sdpa=None, backend=None, note=""):
    def r(x, nd):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)

    return {"impl": impl, "seq": seq, "fwd_ms": r(fwd_ms, 3), "fwdbwd_ms": r(fwdbwd_ms, 3), "peak_mb": r(peak_mb, 2),
            "max_err": None if max_err is None else float(f"{max_err:.3g}"), "ratio_sdpa": r(ratio_sdpa, 3),
            "backend": backend, "note": note}


def plot_rows(rows: list[dict], path) -> None:
    """Time and peak memory by length, one line per implementation (log-log), as a PNG."""
    from adl_cli.engine.plots import series_figure

    timing = "fwdbwd_ms" if any(r.get("fwdbwd_ms") for r in rows) else "fwd_ms"
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    first = rows[0] if rows else {}
    panels = {
        ("forward + backward" if timing == "fwdbwd_ms" else "forward") + " time (ms)": {i: [(r["seq"], r.get(timing)) for r in rows if r["impl"] == i] for i in impls},
        "peak memory beyond the inputs (MB)": {i: [(r["seq"], r.get("peak_mb")) for r in rows if r["impl"] == i] for i in impls},
    }
    title = f"attention by length: B={first.get('batch')} H={first.get('heads')} D={first.get('head_dim')} {first.get('dtype')} on {first.get('device')}"
    series_figure(path, {}, title=title, xlabel="sequence length (tokens)", ylabel="", logx=True, logy=True, panels=panels)
