"""GPT-2 interop with transformers: import a GPT2LMHeadModel folder as an adl run, export back.

Import reads ``DIR/config.json`` and ``DIR/model.safetensors`` (or the shards that
``model.safetensors.index.json`` lists) in transformers' layout, converts them with
``adl_cli.models.hf_gpt2`` and writes an adl run folder (config.json, model.safetensors,
tokenizer.json [+ tokenizer.tiktoken]) that ``adl generate`` reads. The tokenizer, unless
given: the adl tokenizer an ``adl export hf`` left in ``DIR/adl_tokenizer/``; else
``vocab.json`` + ``merges.txt`` converted to tiktoken ranks when they have GPT-2's
layout (no tiktoken cache needed); else the ``gpt2`` kind, which needs tiktoken's cache
at generation time (``adl generate`` says how to provide it).

Export writes ``model.safetensors`` + ``config.json`` (+ ``generation_config.json``) that
``GPT2LMHeadModel.from_pretrained(DIR)`` loads offline, and copies the adl tokenizer
into ``DIR/adl_tokenizer/`` (a plain ``tokenizer.json`` there would be taken for a
Hugging Face tokenizers file). Weights round-trip bit-exactly.
"""

from __future__ import annotations

import json
from adl_cli.fileio import atomic_copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adl_cli.data.tokenizer import Tokenizer, gpt2_tokenizer, make_tokenizer
from adl_cli.engine.checkpoint import atomic_write_text, model_tensors, read_safetensors, save_safetensors
from adl_cli.errors import AdlError, opt
from adl_cli.models import hf_gpt2
from adl_cli.models.gpt import GPT, GPTConfig
from adl_cli.runs import load_run, read_config, save_run

ADL_TOKENIZER_DIR = "adl_tokenizer"
GPT2_META = {"kind": "gpt2", "vocab_size": 50257, "eot_id": 50256}


@dataclass
class InteropResult:
    out: Path
    config: GPTConfig
    tokenizer: str
    parameters: int
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise AdlError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdlError(f"cannot read {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdlError(f"{path}: expected a JSON object")
    return data


def _check_out(src: Path, out: Path, force: bool = False) -> None:
    """--out must be a new or empty folder (or --force, which clears what is in it)."""
    if out.exists() and not out.is_dir():
        raise AdlError(f"{opt('out')} {out} is a file, not a folder")
    if out.exists() and out.resolve() == src.resolve():
        raise AdlError(f"{opt('out')} {out} is the source folder itself; write to another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AdlError(f"{opt('out')} {out} is not empty; choose a new folder or pass {opt('force')} to replace what it holds")


def _clear_out(out: Path) -> None:
    """--force, once the inputs have been read without error: empty --out before writing."""
    import shutil

    if out.is_dir():
        for item in out.iterdir():
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard model.safetensors.index.json names."""
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not files:
            raise AdlError(f"{index} lists no weight files")
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            tensors.update(read_safetensors(src / name))
        return tensors
    if (src / "pytorch_model.bin").exists():
        raise AdlError(
            f"{src} holds pytorch_model.bin but no model.safetensors; adl reads safetensors only (it never unpickles). "
            "Convert once with transformers: GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(NEW_DIR)"
        )
    raise AdlError(f"{src} has no model.safetensors: is it a transformers model folder (save_pretrained)?")


# ----------------------------------------------------------------------------- import


def _write_tokenizer(spec: str | None, src: Path, out: Path, vocab_size: int, notes: list[str]) -> str:
    """Write the run's tokenizer files; returns a description. See the module docstring."""
    meta: dict | None = None
    tok: Tokenizer | None = None
    explicit = spec is not None
    if spec is None:
        saved = src / ADL_TOKENIZER_DIR
        vocab, merges = src / "vocab.json", src / "merges.txt"
        if (saved / "tokenizer.json").exists():
            meta = _read_json(saved / "tokenizer.json")
            if meta.get("kind") != "gpt2":
                tok, meta = Tokenizer.load(saved), None
        elif vocab.exists() and merges.exists():
            try:
                ranks = hf_gpt2.ranks_from_vocab(_read_json(vocab), hf_gpt2.read_merges(merges.read_text(encoding="utf-8")))
            except (ValueError, UnicodeDecodeError) as e:
                notes.append(f"vocab.json/merges.txt not converted ({e}); using the gpt2 tokenizer kind")
                meta = dict(GPT2_META)
            else:
                from adl_cli.data import bpe
                from adl_cli.data.tokenizer import from_ranks_file

                out.mkdir(parents=True, exist_ok=True)
                bpe.save_ranks(ranks, out / "tokenizer.tiktoken")
                tok = from_ranks_file(out / "tokenizer.tiktoken", kind="file", pattern=bpe.GPT2_PATTERN)
                notes.append(f"tokenizer converted from vocab.json + merges.txt ({tok.vocab_size} ids)")
        else:
            meta = dict(GPT2_META)
    elif spec == "gpt2":
        meta = dict(GPT2_META)
    elif Path(spec).is_dir():
        meta = _read_json(Path(spec) / "tokenizer.json")
        if meta.get("kind") != "gpt2":
            tok, meta = Tokenizer.load(Path(spec)), None
    else:
        tok = make_tokenizer(spec)
    if meta is not None:  # the gpt2 kind: written without its files, which may not be cached here
        try:
            gpt2_tokenizer()
        except AdlError:
            notes.append("tokenizer gpt2: tiktoken's gpt2 file is not cached here; `adl generate` explains how to provide it, or pass --tokenizer")
        n = int(meta.get("vocab_size", GPT2_META["vocab_size"]))
        desc = f"gpt2 ({n} ids)"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", json.dumps(meta, indent=1))
    else:
        assert tok is not None
        n = tok.vocab_size
        desc = tok.describe()
        tok.save(out)
    if n > vocab_size:
        msg = f"the tokenizer ({desc}) has more ids than the model's vocabulary ({vocab_size})"
        if explicit:
            raise AdlError(msg + f"; choose another {opt('tokenizer')}")
        notes.append(msg + ": generation may fail; pass --tokenizer bytes|gpt2|PATH")
    return desc


def import_hf_gpt2(src: Path, out: Path, *, tokenizer: str | None = None, force: bool = False) -> InteropResult:
    """A transformers GPT-2 folder -> an adl run folder. AdlError on any bad input."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise AdlError(f"model folder not found: {src}")
    _check_out(src, out, force)
    cfg = hf_gpt2.hf_to_adl_config(_read_json(src / "config.json"), where=str(src / "config.json"))
    tensors = read_hf_weights(src)
    adl = hf_gpt2.hf_to_adl(tensors, cfg, where=str(src / "model.safetensors"))
    model = GPT(cfg)
    model.load_state_dict(adl, strict=False)  # names and shapes were checked; lm_head is tied to wte
    notes: list[str] = []
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in adl.values()})
    if dtypes != ["float32"]:
        notes.append(f"weights stored as {', '.join(dtypes)}, imported as float32")
    _clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    desc = _write_tokenizer(tokenizer, src, out, cfg.vocab_size, notes)
    save_run(out, model)
    return InteropResult(out, cfg, desc, sum(t.numel() for t in adl.values()), notes)


# ----------------------------------------------------------------------------- export


def _write_hf_tokenizer(run_dir: Path, out: Path, hf_cfg: dict) -> bool:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, so that
    ``AutoTokenizer.from_pretrained(out)`` (GPT2Tokenizer, byte-level BPE, GPT-2's pattern)
    encodes exactly as adl. False when the run's tokenizer cannot be written that way."""
    from adl_cli.data import bpe

    if _read_json(run_dir / "tokenizer.json").get("kind") == "gpt2":
        return False  # its files live in tiktoken's cache, which may not be here
    tok = Tokenizer.load(run_dir)
    if tok.kind == "bytes":
        ranks = {bytes([b]): b for b in range(256)}
    elif tok.ranks_path is not None:
        ranks = bpe.load_ranks(tok.ranks_path)
    else:
        return False
    try:
        vocab, merges = hf_gpt2.vocab_and_merges(ranks, eot_id=tok.eot_id)
    except ValueError:
        return False
    if tok.specials or tok.chat or tok.pattern not in (None, bpe.GPT2_PATTERN):
        return _write_fast_tokenizer(tok, vocab, merges, out, hf_cfg)
    eot = "<|endoftext|>"
    atomic_write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": hf_cfg.get("n_positions", 1024), "add_prefix_space": False,
              "add_bos_token": False, "clean_up_tokenization_spaces": False, **special}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return True



def _write_fast_tokenizer(tok: Tokenizer, vocab: dict[str, int], merges, out: Path, hf_cfg: dict) -> bool:
    """A tokenizers-library ``tokenizer.json`` (for a pattern other than GPT-2's, or special tokens
    beyond <|endoftext|>) and a ``tokenizer_config.json`` with the chat template as Jinja, so that
    ``AutoTokenizer.from_pretrained(out)`` encodes and renders conversations as adl does (one
    difference: a message that spells a marker, e.g. ``<|end|>``, is read as the marker there,
    as transformers reads every added token in text; adl encodes message text as text)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as FastTokenizer

    from adl_cli.data import bpe
    from adl_cli.data.chat import ChatTemplate

    eot = "<|endoftext|>"
    vocab = {**vocab, **tok.specials}
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False))
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern or bpe.GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [eot, *tok.specials]])
    fast.save(str(out / "tokenizer.json"))
    template = ChatTemplate.of(tok)
    special = {"bos_token": eot, "eos_token": template.markers["end"] if template else eot, "unk_token": eot, "pad_token": eot}
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": hf_cfg.get("n_positions", 1024),
              "clean_up_tokenization_spaces": False, **special}
    if template is not None:
        config["chat_template"] = template.jinja()
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return True


def export_hf(run_dir: Path, out: Path, *, force: bool = False) -> InteropResult:
    """An adl run folder -> a folder GPT2LMHeadModel.from_pretrained reads offline. An adapter run
    exports its base run there and the adapter, in peft's format, to ``out/adapter``
    (``PeftModel.from_pretrained(model, out / "adapter")``)."""
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise AdlError(f"run folder not found: {run_dir}")
    _check_out(run_dir, out, force)
    adapter = _adapter_of(run_dir)
    if adapter is not None:
        run_dir = adapter[0]
    cfg = read_config(run_dir)
    if cfg.family != "gpt":
        raise AdlError(f"cannot export {run_dir} to transformers' GPT-2: it is a '{cfg.family}' model")
    try:
        hf_gpt2.check_exportable(cfg)
    except AdlError as e:
        raise AdlError(f"cannot export {run_dir} to transformers' GPT-2: {e}") from None
    model = load_run(run_dir).model
    tensors = hf_gpt2.adl_to_hf(model_tensors(model), cfg)
    dtype = str(tensors["transformer.wte.weight"].dtype).removeprefix("torch.")
    tok_meta = _read_json(run_dir / "tokenizer.json") if (run_dir / "tokenizer.json").exists() else {}
    eot = tok_meta.get("eot_id")
    hf_cfg = hf_gpt2.adl_to_hf_config(cfg, eot_id=eot, dtype=dtype)
    _clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(hf_cfg, indent=2) + "\n")
    if hf_cfg.get("eos_token_id") is not None:  # generate() stops at <|endoftext|> (and a chat template's end)
        chat_end = (tok_meta.get("chat") or {}).get("markers", {}).get("end")
        eos_ids = hf_cfg["eos_token_id"] if chat_end is None else [tok_meta["specials"][chat_end], hf_cfg["eos_token_id"]]
        gen = {"bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": eos_ids}
        atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    notes: list[str] = []
    desc = "none"
    if tok_meta:
        dest = out / ADL_TOKENIZER_DIR
        dest.mkdir(exist_ok=True)
        atomic_copy(run_dir / "tokenizer.json", dest / "tokenizer.json")
        ranks = tok_meta.get("ranks")
        if ranks and (run_dir / ranks).exists():
            atomic_copy(run_dir / ranks, dest / ranks)
        desc = f"{tok_meta.get('kind')} ({tok_meta.get('vocab_size')} ids), copied to {dest.name}/ for `adl import hf-gpt2`"
        if _write_hf_tokenizer(run_dir, out, hf_cfg):
            desc += "; vocab.json + merges.txt for transformers' AutoTokenizer"
        else:
            notes.append(f"the {tok_meta.get('kind')} tokenizer is not written for transformers (its files are not here); AutoTokenizer needs them")
    else:
        notes.append(f"{run_dir} has no tokenizer.json: only the weights were exported")
    if adapter is not None:
        from adl_cli.adapters.peft_gpt2 import write_peft_adapter

        _, meta, adapter_tensors = adapter
        write_peft_adapter(out / "adapter", adapter_tensors, meta.get("config", {}), dict(model.state_dict()))
        notes.append(f"the base run {run_dir} is the model; its {meta['kind']} adapter is in {out / 'adapter'} "
                     f"(peft.PeftModel.from_pretrained(model, that folder))")
    return InteropResult(out, cfg, desc, sum(t.numel() for t in tensors.values()), notes)


def _adapter_of(run_dir: Path):
    """(base run folder, adapter.json, adapter tensors) of an adapter run, else None."""
    from adl_cli.runs import ADAPTER, ADAPTER_WEIGHTS, adapter_meta

    if not (run_dir / ADAPTER).exists():
        return None
    meta, base = adapter_meta(run_dir)
    if meta.get("kind") != "lora":
        raise AdlError(f"cannot export the {meta.get('kind')!r} adapter of {run_dir} to peft (only LoRA and DoRA adapters)")
    if meta.get("grow") or meta.get("model") or meta.get("config", {}).get("qlora") is not None:
        why = ("its base gains the chat template's token rows" if meta.get("grow") else
               "its base is read at another context" if meta.get("model") else "its base is NF4")
        raise AdlError(f"cannot export {run_dir} as a peft adapter: {why}; fold it first (adl lora merge {run_dir} --out DIR), then adl export hf DIR OUT")
    return base, meta, read_safetensors(run_dir / ADAPTER_WEIGHTS)
