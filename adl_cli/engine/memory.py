"""Peak tensor memory, measured by what operators allocate (not process RSS).

CUDA: the caching allocator's ``max_memory_allocated``. CPU: torch keeps no allocator
statistics, so a ``TorchDispatchMode`` records every tensor storage an operator creates (its
size from the storage, its release from a weakref finalizer on it) and keeps the high-water mark
of the live total. Everything autograd saves, every temporary, gradients and optimizer state
count; scratch buffers a fused C++ kernel allocates inside itself (a few MB) are not seen.

``step_memory`` is what fine-tuning comparisons quote: the model's own tensors (parameters and
buffers, 4-bit weights at their packed size) plus the peak of what one training step adds
(activations, gradients, optimizer state).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensors(TorchDispatchMode):
    """High-water mark of the bytes of tensor storages created by operators (CPU)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # views and in-place results own no new memory
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key == 0 or key in self.live:
                    continue
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory held by fn() beyond what existed before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    tracker = LiveTensors()
    with tracker:
        fn()
    return tracker.peak


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied tables count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    for m in model.modules():  # bitsandbytes keeps a 4-bit weight's block scales beside it
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values() if torch.is_tensor(v))
    return total


def step_memory(model: nn.Module, step: Callable[[], object], device: torch.device) -> dict[str, int]:
    """{"model": bytes of the model's tensors, "step": peak added by ``step()`` (a forward,
    backward and optimizer step), "peak": their sum}."""
    base = tensor_bytes(model)
    added = peak_bytes(step, device)
    return {"model": base, "step": added, "peak": base + added}
