"""The decode state: what a model keeps between decoding steps, preallocated and updated in place.

A model's ``setup_cache(batch, max_len)`` returns a ``DecodeState``: one cache module per layer,
each built by the layer itself (``block.make_cache``), so every attention or recurrent block
owns its layout:

    KVCache          MHA / GQA: k and v, (B, H_kv, max_len, D) each; step t writes row t
    RollingKVCache   sliding window W: only the last W - 1 keys are needed by a later query,
                     so a ring of W - 1 rows (memory O(W), not O(context))
    LatentCache      MLA: the latent c_kv (B, max_len, r) and the shared RoPE key (B, max_len, d_R)
    RecurrentState   RNN / SSM families: a fixed-size state (B, ...) replaced every step

Writing is in place (``index_copy_`` into the preallocated rows): no ``torch.cat`` that copies
the whole cache for every token. A cache returns views of what is filled, so the kernels see
keys at positions 0 .. length-1 and the new queries at the end (their q_offset is
length - T: mask.py). ``reset()`` empties the state for the next batch without reallocating.
``pad`` (B,) marks left padding (a batch of prompts of different lengths: GPT._hidden turns it
into per-row positions and a mask); ``reorder(index)`` selects or repeats batch rows.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerCache(nn.Module):
    """One layer's part of the decode state. ``length``: positions seen so far."""

    def __init__(self):
        super().__init__()
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative decoding rolls back rejected
        drafts); the rows stay allocated and are overwritten by later writes."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if length < self.length and not self.can_truncate:
            raise ValueError(f"{type(self).__name__} cannot roll back: it keeps no rows for past positions")
        self.length = length

    can_truncate = True  # a ring (sliding window) or a recurrent state cannot go back

    def _write(self, dim: int, max_len: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Write each new tensor into its buffer's rows length.. along ``dim``; returns the new length."""
        t = pairs[0][1].shape[dim]
        end = self.length + t
        if end > max_len:
            raise ValueError(f"the decode state holds {max_len} positions; {end} were asked for (reset it or set it up longer)")
        rows = torch.arange(self.length, end, device=pairs[0][0].device)
        for buf, new in pairs:
            buf.index_copy_(dim, rows, new.to(buf.dtype))
        self.length = end
        return end


class KVCache(LayerCache):
    can_be_static = True

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, *, dtype=torch.float32, device=None, v_dim: int | None = None):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("k", torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, heads, max_len, v_dim or head_dim, dtype=dtype, device=device), persistent=False)
        self.static_position: torch.Tensor | None = None  # set by DecodeState.make_static

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new keys/values (B, H, T, D) after the filled rows; the filled views back. A
        static state writes one position at the position tensor and returns the whole buffers
        (fixed shapes, for torch.compile; the model masks the rows not written yet)."""
        if self.static_position is not None:
            rows = self.static_position + torch.arange(k.shape[2], device=self.k.device)
            self.k.index_copy_(2, rows, k.to(self.k.dtype))
            self.v.index_copy_(2, rows, v.to(self.v.dtype))
            return self.k, self.v
        end = self._write(2, self.max_len, [(self.k, k), (self.v, v)])
        return self.k[:, :, :end], self.v[:, :, :end]


class RollingKVCache(LayerCache):
    """Sliding-window attention's cache: a ring of the last ``window - 1`` keys and values.

    A new chunk of T queries needs the previous W - 1 keys and its own T; ``append`` returns them
    in order (the ring read from its oldest row, then the chunk), which is O(W) per step whatever
    the length of the context."""

    can_truncate = False

    def __init__(self, batch: int, heads: int, window: int, head_dim: int, *, dtype=torch.float32, device=None):
        super().__init__()
        self.keep = max(window - 1, 0)
        self.register_buffer("k", torch.zeros(batch, heads, self.keep, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, heads, self.keep, head_dim, dtype=dtype, device=device), persistent=False)

    def _ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(self.length, self.keep)
        if n == 0:
            return self.k[:, :, :0], self.v[:, :, :0]
        start = (self.length - n) % self.keep  # the oldest kept row
        idx = (torch.arange(n, device=self.k.device) + start) % self.keep
        return self.k.index_select(2, idx), self.v.index_select(2, idx)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self._ordered()
        k_all = torch.cat((past_k, k.to(self.k.dtype)), dim=2)
        v_all = torch.cat((past_v, v.to(self.v.dtype)), dim=2)
        t = k.shape[2]
        if self.keep:
            n = min(t, self.keep)  # the chunk's last rows overwrite the oldest ones
            rows = (torch.arange(self.length + t - n, self.length + t, device=self.k.device)) % self.keep
            self.k.index_copy_(2, rows, k[:, :, t - n:].to(self.k.dtype))
            self.v.index_copy_(2, rows, v[:, :, t - n:].to(self.v.dtype))
        self.length += t
        return k_all, v_all


class LatentCache(LayerCache):
    """Multi-head latent attention: the compressed c_kv and the shared rotary key per position."""

    def __init__(self, batch: int, max_len: int, latent_dim: int, rope_dim: int, *, dtype=torch.float32, device=None):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("c_kv", torch.zeros(batch, max_len, latent_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("k_rope", torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device), persistent=False)

    def append(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._write(1, self.max_len, [(self.c_kv, c_kv), (self.k_rope, k_rope)])
        return self.c_kv[:, :end], self.k_rope[:, :end]


class RecurrentState(LayerCache):
    """A fixed-size state (B, *shape) that a recurrent block reads and replaces every step."""

    can_truncate = False

    def __init__(self, batch: int, *shape: int, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("state", torch.zeros(batch, *shape, dtype=dtype, device=device), persistent=False)

    def reset(self) -> None:
        super().reset()
        self.state.zero_()

    def update(self, new: torch.Tensor, steps: int) -> None:
        self.state.copy_(new)
        self.length += steps


class DecodeState(nn.Module):
    """Per-layer caches of one batch of sequences; ``length`` positions are filled."""

    def __init__(self, layers: list[LayerCache], max_len: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.max_len = max_len
        # Left padding of a batch of prompts of different lengths: row b's first pad[b] positions
        # are padding, which the model masks out and does not count in the row's positions.
        self.pad: torch.Tensor | None = None
        # Static decoding (make_static): steps of one token written at ``position``, a tensor, so
        # that a compiled step sees the same shapes and Python values every time.
        self.static = False
        device = layers[0].k.device if layers and hasattr(layers[0], "k") else None
        self.register_buffer("position", torch.zeros(1, dtype=torch.long, device=device), persistent=False)

    @property
    def can_be_static(self) -> bool:
        return bool(len(self.layers)) and all(getattr(layer, "can_be_static", False) for layer in self.layers)

    def make_static(self) -> None:
        """Decode from here on at the position tensor (the caches' full buffers are attended to, the
        model masks what is not written yet); ``advance(n)`` after each step of n tokens."""
        if not self.can_be_static:
            raise ValueError("only a state of full key/value caches decodes statically")
        self.position.fill_(self.length)
        for layer in self.layers:
            layer.static_position = self.position
        self.static = True

    def advance(self, n: int = 1) -> None:
        """After a static step of n tokens: n more positions are filled."""
        self.position += n
        for layer in self.layers:
            vars(layer)["length"] += n  # (a plain int in the module's dict; nn.Module.__setattr__ is slow per step)

    @property
    def length(self) -> int:
        return self.layers[0].length if len(self.layers) else 0

    def make_dynamic(self) -> None:
        """Back to caches that grow with what is written (a prefill, a pass of another length)."""
        for layer in self.layers:
            if self.static:
                layer.static_position = None
        self.static = False

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.make_dynamic()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)
        if self.static:
            self.position.fill_(length)

    @property
    def can_truncate(self) -> bool:
        return all(layer.can_truncate for layer in self.layers)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (and repeat) the batch rows ``index``, in that order: N samples of one prompt share
        its prefill, finished rows leave the batch. Every cache buffer is indexed along its batch dim."""
        for layer in self.layers:
            for name, buf in list(layer.named_buffers(recurse=False)):
                setattr(layer, name, buf.index_select(0, index.to(buf.device)))
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index.to(self.pad.device))

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]
