"""Outlier channels injected into a trained model without changing what it computes.

Large language models grow a few activation channels far larger than the rest (Dettmers et al.
2022), which is what LLM.int8(), SmoothQuant and AWQ are built for; small models trained here have
few. ``inject_outliers`` makes them: for every normalisation layer whose output feeds linear layers
directly (found by watching one forward), ``n`` of its channels j get their affine weight (and bias)
multiplied by ``scale`` and the reading layers' input columns j divided by it:

    y = W (c g_j xhat_j + c b_j) / c  = the same product,

so the model's function is unchanged (up to float rounding) while those input channels now carry
activations ``scale`` times larger, into weights ``scale`` times smaller.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def inject_outliers(model: nn.Module, sample: torch.Tensor, *, n: int = 4, scale: float = 30.0, seed: int = 0) -> int:
    """Inject ``n`` outlier channels after each normalisation that feeds linear layers; ``sample``: a
    batch of token ids for the watching forward. Returns how many norms were changed."""
    norms = {name: m for name, m in model.named_modules() if getattr(m, "weight", None) is not None
             and not isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.dim() == 1}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors held, so that no id is reused
    readers: dict[str, list[nn.Linear]] = {}
    hooks = []
    for name, m in norms.items():
        hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(id(out), (name, out))))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            def pre(mod, args):
                src = outputs.get(id(args[0]))
                if src is not None and src[1] is args[0] and mod not in readers.setdefault(src[0], []):
                    readers[src[0]].append(mod)
            hooks.append(m.register_forward_pre_hook(pre))
    try:
        model.eval()(sample)
    finally:
        for h in hooks:
            h.remove()
    shared = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    for name, linears in readers.items():
        if any(lin.weight.data_ptr() in shared for lin in linears):
            continue  # a head tied to the token table: dividing its columns would change the embedding too
        norm = norms[name]
        channels = torch.randperm(norm.weight.shape[0], generator=gen)[:n]
        norm.weight[channels] *= scale
        if getattr(norm, "bias", None) is not None:
            norm.bias[channels] *= scale
        for lin in linears:
            lin.weight[:, channels] /= scale
        changed += 1
    return changed
