"""Supervised examples as token rows: loss masks, the truncation policy, packing, batches.

An example is a rendered conversation: ids and, per id, whether it is a target. The model reads
``ids[:-1]`` and is scored on ``ids[1:]`` where the target is trained (-100 elsewhere). An
example longer than the context (``block_size + 1`` ids) is either dropped (``drop``) or loses
ids from its left (``left``: the oldest prompt text goes first; an answer that alone does not
fit is dropped); both are counted and reported.

Packing puts several examples into one row of ``block_size`` positions, each with its own
segment id: attention never crosses examples (the segment mask) and positions restart at each
example's start, so a packed example's loss equals its loss alone. Unpacked, each row holds one
example, padded to the longest row of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adl_cli.data.batches import EpochBatches

IGNORE = -100


@dataclass
class Example:
    inputs: np.ndarray  # (L,) int64 ids the model reads
    targets: np.ndarray  # (L,) int64 next ids, IGNORE where not trained
    source: str = ""  # task name or file

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def trained(self) -> int:
        return int((self.targets != IGNORE).sum())


@dataclass
class Encoded:
    examples: list[Example]
    dropped: int = 0  # longer than the context (or nothing left to train)
    truncated: int = 0  # shortened from the left to fit


def make_example(ids: list[int], trained: list[bool], block_size: int, truncation: str, source: str = "") -> Example | None:
    """One example from rendered ids, or None when the truncation policy drops it."""
    ids_a = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(trained, dtype=bool)
    if len(ids_a) - 1 > block_size:
        if truncation != "left":
            return None
        first = int(np.argmax(mask)) if mask.any() else len(mask)
        keep_from = len(ids_a) - (block_size + 1)
        if keep_from >= first:  # the first trained id would be cut away (or its context start): drop
            return None
        ids_a, mask = ids_a[keep_from:], mask[keep_from:]
    targets = np.where(mask[1:], ids_a[1:], IGNORE)
    if not (targets != IGNORE).any():
        return None
    return Example(ids_a[:-1].copy(), targets.astype(np.int64), source)


def encode_conversations(template, conversations, block_size: int, *, truncation: str = "drop", train_on_prompt: bool = False,
                         source: str = "") -> Encoded:
    out = Encoded([])
    for ids, trained in template.render_many(conversations, train_on_prompt=train_on_prompt):
        ex = make_example(ids, trained, block_size, truncation, source)
        if ex is None:
            out.dropped += 1
            continue
        if len(ex) + 1 < len(ids):
            out.truncated += 1
        out.examples.append(ex)
    return out


@dataclass
class Rows:
    """Fixed token rows: inputs, targets and segment ids (R, T); lengths = real tokens per row."""

    inputs: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor | None
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


OPEN_ROWS = 16  # first fit looks at the last rows opened only: linear time, a few percent of padding


def pack(examples: list[Example], block_size: int, *, seed: int = 0, pad_id: int = 0) -> Rows:
    """Examples (in a seeded random order) filled into rows of block_size positions, first fit
    among the last OPEN_ROWS rows; the tail of a row is padding in a segment of its own."""
    order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i])
        for r in range(max(0, len(rows) - OPEN_ROWS), len(rows)):
            if free[r] >= n:
                rows[r].append(int(i))
                free[r] -= n
                break
        else:
            rows.append([int(i)])
            free.append(block_size - n)
    R = len(rows)
    inputs = torch.full((R, block_size), pad_id, dtype=torch.long)
    targets = torch.full((R, block_size), IGNORE, dtype=torch.long)
    segments = torch.zeros((R, block_size), dtype=torch.long)
    lengths = torch.zeros(R, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            ex = examples[i]
            n = len(ex)
            inputs[r, at:at + n] = torch.from_numpy(ex.inputs)
            targets[r, at:at + n] = torch.from_numpy(ex.targets)
            segments[r, at:at + n] = s
            at += n
        segments[r, at:] = len(members)  # padding: its own segment
        lengths[r] = at
    return Rows(inputs, targets, segments, lengths)


def unpacked(examples: list[Example], block_size: int, *, pad_id: int = 0) -> Rows:
    """One example per row (padded to block_size here; a batch trims to its longest row)."""
    R = len(examples)
    inputs = torch.full((R, block_size), pad_id, dtype=torch.long)
    targets = torch.full((R, block_size), IGNORE, dtype=torch.long)
    lengths = torch.zeros(R, dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex)
        inputs[r, :n] = torch.from_numpy(ex.inputs)
        targets[r, :n] = torch.from_numpy(ex.targets)
        lengths[r] = n
    return Rows(inputs, targets, None, lengths)


def collate(rows: Rows, idx: torch.Tensor) -> dict:
    """A batch of rows, trimmed to its longest row's real length."""
    width = max(1, int(rows.lengths[idx].max()))
    batch = {"inputs": rows.inputs[idx, :width], "targets": rows.targets[idx, :width], "tokens": int(rows.lengths[idx].sum())}
    if rows.segments is not None:
        batch["segments"] = rows.segments[idx, :width]
    return batch


class RowBatches(EpochBatches):
    """Epochs over token rows (EpochBatches' order, state and resume), counting the real tokens
    each global batch holds (``tokens_seen``: prompt and answer, without padding)."""

    def __init__(self, rows: Rows, batch_size: int, grad_accum: int, seed: int, world: int = 1):
        self.rows = rows
        self.tokens_seen = 0
        super().__init__(len(rows), batch_size, grad_accum, seed, lambda idx: collate(rows, idx), world)

    def __call__(self, step: int, micro: int, rank: int, world: int):
        new = step != self.step
        batch = super().__call__(step, micro, rank, world)
        if new:
            self.tokens_seen += int(self.rows.lengths[self.order[self.position:self.position + self.per_step]].sum())
        return batch

    def state_dict(self):
        return {**super().state_dict(), "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.tokens_seen = int(state.get("tokens_seen", 0))
