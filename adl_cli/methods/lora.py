"""What `adl lora` does with adapter runs: merge one into a plain run folder.

A LoRA or DoRA adapter folds into its base weights: the merged folder is an ordinary run
(config, weights, tokenizer, lineage naming the base and the adapter) that every command reads
without peft. A QLoRA adapter folds into its base's NF4 weights (dequantized, not the original
full-precision ones: the model it trained with). New token rows fold into the vocabulary tables.
Bottleneck adapters cannot fold (they are non-linear) and are refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from adl_cli.errors import AdlError, opt
from adl_cli.runs import ADAPTER, ADAPTER_WEIGHTS, adapter_meta, file_digest, load_run, save_run, write_lineage


def merge_run(adapter_run: Path, out: Path, *, force: bool = False) -> Path:
    """Fold the adapter of ``adapter_run`` into its base; write a plain run folder at ``out``."""
    from adl_cli.adapters.lora import merge

    adapter_run, out = Path(adapter_run), Path(out)
    if not (adapter_run / ADAPTER).exists():
        raise AdlError(f"{adapter_run} is not an adapter run (it has no {ADAPTER}); only adapters merge")
    meta, _ = adapter_meta(adapter_run)
    if meta.get("kind") != "lora":
        raise AdlError(f"{adapter_run}: a {meta.get('kind')!r} adapter cannot be folded into the base weights (its layers are non-linear); "
                       "load it as it is (adl generate, adl chat and adl eval read adapter runs)")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise AdlError(f"{out} is not empty; choose another {opt('out')} or replace it with {opt('force')}")
    run = load_run(adapter_run)  # base + adapter, checked before anything is removed
    model = run.model
    if meta.get("config", {}).get("qlora") is not None:  # the NF4 base in full precision, the update added
        from adl_cli.adapters.qlora import merge_quantized

        model = merge_quantized(model)
    model = merge(model)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_run(out, model, run.tokenizer)
    write_lineage(out, [*run.lineage, {"kind": "merged-adapter", "path": str(adapter_run), "weights": ADAPTER_WEIGHTS,
                                       "sha256": file_digest(adapter_run / ADAPTER_WEIGHTS)}])
    return out
