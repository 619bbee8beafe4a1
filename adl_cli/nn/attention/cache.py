"""KV-cache size per token of context, by attention type.

    MHA / GQA:  2 * n_layer * n_kv_head * head_dim * bytes     (keys and values)
    MLA:        n_layer * (kv_lora_rank + rope_head_dim) * bytes (latent + shared rope key)

(Shazeer 2019 for multi-query, Ainslie et al. 2023 for grouped-query, DeepSeek-V2 2024
for latent attention.) A block in ATTENTION_BLOCKS with its own cache layout declares
it through a ``cache_bytes_per_token(config, dtype_bytes)`` static method.
"""

from __future__ import annotations

from adl_cli.nn.attention import ATTENTION_BLOCKS


def kv_cache_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """Bytes of KV cache one token of context costs, summed over all layers of ``config``."""
    if config.attention in ATTENTION_BLOCKS:
        per_token = getattr(ATTENTION_BLOCKS.get(config.attention), "cache_bytes_per_token", None)
        if per_token is not None:
            return per_token(config, dtype_bytes)
    return 2 * config.n_layer * config.kv_heads * config.head_dim * dtype_bytes


def cache_bytes(state) -> int:
    """Bytes held by a model's decode state (``setup_cache``; to check the formula)."""
    return state.nbytes()
