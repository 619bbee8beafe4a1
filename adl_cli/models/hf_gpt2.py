"""GPT-2 weights between adl's GPT and transformers' ``GPT2LMHeadModel`` layout.

Both models compute the same function, so conversion is renaming plus one transpose:

    adl                                   transformers (GPT2LMHeadModel)
    transformer.wte.weight       (V, C)   transformer.wte.weight       (V, C)
    transformer.pos.wpe.weight   (T, C)   transformer.wpe.weight       (T, C)
    h.N.attn.{q,k,v}_proj   (C, C) x3     h.N.attn.c_attn.weight  (C, 3C)   Conv1D: y = x W + b,
    h.N.attn.c_proj.weight  (C, C)        h.N.attn.c_proj.weight  (C, C)    W stored (in, out),
    h.N.mlp.c_fc.weight     (4C, C)       h.N.mlp.c_fc.weight     (C, 4C)   the transpose of
    h.N.mlp.c_proj.weight   (C, 4C)       h.N.mlp.c_proj.weight   (4C, C)   nn.Linear's (out, in)
    lm_head.weight = wte (tied)           lm_head.weight = wte (tied; usually not in the file)

adl keeps q, k and v as three projections (so adapters can target each); GPT-2 fuses them
into ``c_attn`` with rows q | k | v, so conversion concatenates or splits them.
LayerNorms and biases carry over unchanged; GPT-2 has every bias, LayerNorm eps 1e-5 and
the tanh GELU ("gelu_new"). Older transformers files may hold ``attn.bias`` and
``attn.masked_bias`` (causal-mask buffers, not weights) and files saved from
``GPT2Model`` lack the ``transformer.`` prefix; both are accepted on import. Only a GPT
that is GPT-2 (learned positions, multi-head attention, plain softmax attention) can be
exported. A transpose only moves numbers, so both directions are bit-exact.

This module is plain functions on state dicts and config dicts: it imports neither the
CLI nor transformers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adl_cli.errors import AdlError
from adl_cli.models.gpt import GPT, GPTConfig, fuse_qkv, upgrade_state

COMPILE_PREFIX = "_orig_mod."
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_EPS = 1e-5  # adl's LayerNorm eps (torch's default), and GPT-2's
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # the same function, 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
STANDARD_ATTENTION = ("naive", "sdpa", "flash")  # exact softmax(QK^T/sqrt(d))V kernels
BUFFERS = (".attn.bias", ".attn.masked_bias")


def _strip(name: str) -> str:
    return name.replace(COMPILE_PREFIX, "")


# ----------------------------------------------------------------------------- configs


def hf_to_adl_config(hf: dict[str, Any], *, where: str = "config.json") -> GPTConfig:
    """GPTConfig from a transformers GPT-2 config dict; anything GPT-2-incompatible is an AdlError."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        arch = ", ".join(hf.get("architectures") or []) or "unknown architecture"
        raise AdlError(f"{where}: model_type is {model_type!r} ({arch}); only GPT-2 checkpoints (model_type 'gpt2') can be imported")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in hf]
    if missing:
        raise AdlError(f"{where}: missing {', '.join(missing)}")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise AdlError(f"{where}: activation_function {act!r} is not supported; adl's GPT uses the tanh GELU ({' or '.join(TANH_GELUS)})")
    eps = float(hf.get("layer_norm_epsilon", GPT2_EPS))
    if not math.isclose(eps, GPT2_EPS, rel_tol=1e-9):
        raise AdlError(f"{where}: layer_norm_epsilon {eps} is not supported; adl's GPT uses {GPT2_EPS} (GPT-2's value)")
    n_embd = int(hf["n_embd"])
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * n_embd):
        raise AdlError(f"{where}: n_inner {n_inner} is not supported; adl's MLP is 4 * n_embd = {4 * n_embd} wide")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if key in hf and bool(hf[key]) != want:
            raise AdlError(f"{where}: {key} = {hf[key]!r} is not supported (GPT-2 uses {want})")
    block = hf.get("n_positions", hf.get("n_ctx"))
    if block is None:
        raise AdlError(f"{where}: missing n_positions")
    try:
        return GPTConfig(
            vocab_size=int(hf["vocab_size"]),
            block_size=int(block),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=n_embd,
            bias=True,
            dropout=0.0,
            attention="sdpa",
            position="learned",
        )
    except (ValueError, TypeError) as e:
        raise AdlError(f"{where}: {e}") from None


def check_exportable(cfg: GPTConfig) -> None:
    """AdlError unless the model is a GPT-2: learned positions, MHA, exact softmax attention."""
    if cfg.position != "learned":
        raise AdlError(f"this model uses {cfg.position!r} positions; GPT-2 (transformers' GPT2LMHeadModel) has learned positions only")
    if cfg.kv_heads != cfg.n_head:
        raise AdlError(f"this model uses grouped-query attention ({cfg.kv_heads} key/value heads for {cfg.n_head} query heads); GPT-2 has multi-head attention only")
    if cfg.attention not in STANDARD_ATTENTION:
        raise AdlError(f"this model uses the {cfg.attention!r} attention block; GPT-2 has standard multi-head attention only ({', '.join(STANDARD_ATTENTION)})")
    if cfg.attention_options:
        raise AdlError(f"this model uses attention options {cfg.attention_options}; GPT-2 has plain full causal attention only")
    modern = {"norm": "layernorm", "mlp": "gelu", "mlp_hidden": 0, "qk_norm": False, "tie_embeddings": True, "logit_softcap": 0.0,
              "unet_skips": False, "mtp_heads": 0}
    changed = [f"{k}={getattr(cfg, k)!r}" for k, v in modern.items() if getattr(cfg, k) != v and not (k == "mlp_hidden" and getattr(cfg, k) == 4 * cfg.n_embd)]
    if changed:
        raise AdlError(f"this model uses {', '.join(changed)}; GPT-2 (transformers' GPT2LMHeadModel) has none of these options")


def adl_to_hf_config(cfg: GPTConfig, *, eot_id: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """transformers' GPT2Config as a dict, ready for config.json."""
    check_exportable(cfg)
    out: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "layer_norm_epsilon": GPT2_EPS,
        "initializer_range": 0.02,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": dtype,
    }
    if eot_id is not None and 0 <= eot_id < cfg.vocab_size:
        out["bos_token_id"] = out["eos_token_id"] = int(eot_id)
    else:  # GPT2Config's defaults (50256) would name ids this vocabulary may not have: say "none"
        out["bos_token_id"] = out["eos_token_id"] = None
    return out


# ----------------------------------------------------------------------------- weights


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """adl parameter names -> shapes for ``cfg``, q/k/v fused into ``c_attn`` as in GPT-2 (built on
    the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = GPT(cfg)
    state = {_strip(k): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return {k: tuple(v.shape) for k, v in fuse_qkv(state).items()}


def hf_to_adl(tensors: dict[str, torch.Tensor], cfg: GPTConfig, *, where: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """adl state dict (no lm_head: it is tied) from a transformers GPT-2 state dict."""
    out: dict[str, torch.Tensor] = {}
    lm_head = None
    for name, t in tensors.items():
        key = _strip(name)
        if key.endswith(BUFFERS):
            continue
        if key == "lm_head.weight":
            lm_head = t
            continue
        if not key.startswith("transformer."):
            key = "transformer." + key
        if key == "transformer.wpe.weight":
            key = "transformer.pos.wpe.weight"
        elif key.endswith(CONV1D):
            if t.dim() != 2:
                raise AdlError(f"{where}: '{name}' should be a matrix, got shape {tuple(t.shape)}")
            t = t.t()
        out[key] = t.contiguous()
    _check_shapes(out, cfg, where, direction="transformers")
    if lm_head is not None and not torch.equal(lm_head, out["transformer.wte.weight"]):
        raise AdlError(f"{where}: lm_head.weight differs from transformer.wte.weight; adl's GPT ties them (untied heads are not supported)")
    return upgrade_state(out)


def adl_to_hf(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """transformers GPT2LMHeadModel state dict (tied lm_head left out, as save_pretrained does).

    A model built with ``bias=False`` gets zero biases: the same function in GPT-2's layout.
    """
    check_exportable(cfg)
    src = fuse_qkv({_strip(k): v for k, v in tensors.items()})
    head = src.pop("lm_head.weight", None)
    if head is not None and "transformer.wte.weight" in src and not torch.equal(head, src["transformer.wte.weight"]):
        raise AdlError("lm_head.weight differs from transformer.wte.weight; GPT-2 ties them")
    _check_shapes(src, cfg, "the model", direction="adl")
    out: dict[str, torch.Tensor] = {}
    for key, t in src.items():
        if key == "transformer.pos.wpe.weight":
            key = "transformer.wpe.weight"
        elif key.endswith(CONV1D):
            t = t.t()
        out[key] = t.detach().contiguous().cpu()
    if not cfg.bias:
        dtype = out["transformer.wte.weight"].dtype
        for key, shape in expected_shapes(GPTConfig(**{**cfg.to_dict(), "bias": True})).items():
            hf_key = _hf_name(key)
            if key.endswith(CONV1D):
                shape = shape[::-1]
            if hf_key not in out:
                out[hf_key] = torch.zeros(shape, dtype=dtype)
    return out


def _hf_name(key: str) -> str:
    return "transformer.wpe.weight" if key == "transformer.pos.wpe.weight" else key


def _check_shapes(tensors: dict[str, torch.Tensor], cfg: GPTConfig, where: str, *, direction: str) -> None:
    """Same names and shapes as ``cfg`` implies (names shown in ``direction``'s layout)."""
    want = expected_shapes(cfg)
    show = _hf_name if direction == "transformers" else (lambda k: k)
    missing = sorted(show(k) for k in set(want) - set(tensors))
    extra = sorted(show(k) for k in set(tensors) - set(want))
    if missing:
        raise AdlError(f"{where} does not match its config: missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        raise AdlError(f"{where} does not match a GPT-2 ({direction} layout): unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    for key, shape in want.items():
        got = tuple(tensors[key].shape)
        if direction == "transformers" and key.endswith(CONV1D):
            got, shape = got[::-1], shape[::-1]  # report in the file's (in, out) layout
        if got != shape:
            raise AdlError(f"{where}: '{show(key)}' has shape {got}, the config implies {shape}")


# ----------------------------------------------------------------------------- tokenizer


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte in vocab.json/merges.txt.

    Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves;
    the other 68 get the code points 256, 257, ... in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def ranks_from_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], *, eot: str = "<|endoftext|>") -> dict[bytes, int]:
    """tiktoken ranks (token bytes -> id) from a GPT-2 style vocab.json + merges.txt.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, BPE the
    pair listed first in merges.txt; the two agree when ids grow in merge order, which
    is checked here, together with the layout adl's tokenizer files assume: the 256
    bytes and merge results hold ids 0..M-1 and ``eot`` is M, the only other token.
    ValueError says what does not fit.
    """
    decode = {c: b for b, c in byte_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(decode[c] for c in token)
        except KeyError:
            raise ValueError(f"token {token!r} is not in GPT-2's byte-level alphabet") from None

    ranks: dict[bytes, int] = {}
    for b, c in byte_to_unicode().items():
        if c not in vocab:
            raise ValueError(f"vocab.json has no token for byte {b}")
        ranks[bytes([b])] = vocab[c]
    last = -1
    for a, b in merges:
        token = a + b
        if token not in vocab:
            raise ValueError(f"merge {a!r} {b!r} makes {token!r}, which vocab.json lacks")
        rank = vocab[token]
        if rank <= last:
            raise ValueError(f"ids do not grow in merge order (merge {a!r} {b!r} -> id {rank} after id {last})")
        last = rank
        ranks[to_bytes(token)] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("the byte and merged tokens do not hold the ids 0..M-1 contiguously")
    others = {t: i for t, i in vocab.items() if i >= len(ranks)}
    if others != {eot: len(ranks)}:
        raise ValueError(f"expected exactly one special token {eot!r} = {len(ranks)} after the merged tokens, found {dict(list(others.items())[:3])}")
    return ranks


def _bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's merge loop on ``token`` using only ranks < ``below``: lowest-rank adjacent pair first."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < below and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def vocab_and_merges(ranks: dict[bytes, int], *, eot_id: int, eot: str = "<|endoftext|>") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2 style vocab.json + merges.txt for tiktoken ranks (the inverse of ranks_from_vocab).

    A merged token of rank r is the pair that tiktoken's loop, allowed ranks < r, leaves
    when it encodes the token's bytes; listing merges in rank order makes BPE (which
    applies the earliest listed pair first) choose exactly as tiktoken does."""
    enc = byte_to_unicode()

    def text(tok: bytes) -> str:
        return "".join(enc[b] for b in tok)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = _bpe_parts(tok, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {tok!r} (id {rank}) is not one merge of two lower-ranked tokens")
        merges.append((text(parts[0]), text(parts[1])))
    vocab[eot] = eot_id
    return vocab, merges


def read_merges(text: str) -> list[tuple[str, str]]:
    """merges.txt: an optional '#version' line, then 'a b' per line."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merges.txt line {line[:60]!r} is not 'a b'")
        out.append((parts[0], parts[1]))
    return out
