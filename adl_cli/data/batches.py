"""A batch source with state: epochs over a finite set of examples, reshuffled every epoch.

Each epoch visits every example once in a fresh random order (its own generator, so training's
RNG is untouched). Step t's global batch is the next ``batch_size * grad_accum * world``
examples of the order (an epoch's tail that is too short is dropped, as a DataLoader with
drop_last does); micro-step m on rank r takes slice ``m * world + r``. The order, the position
and the generator are the source's state: the trainer saves it in every checkpoint and
restores it on resume, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class EpochBatches:
    def __init__(self, n_examples: int, batch_size: int, grad_accum: int, seed: int, collate: Callable[[torch.Tensor], Any], world: int = 1):
        if n_examples < batch_size * grad_accum * world:
            raise ValueError(f"{n_examples} examples cannot fill one global batch of {batch_size * grad_accum * world}")
        self.n, self.batch_size, self.grad_accum, self.world = n_examples, batch_size, grad_accum, world
        self.collate = collate
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0
        self.order = torch.randperm(self.n, generator=self.generator)
        self.step = None

    @property
    def per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def __call__(self, step: int, micro: int, rank: int, world: int):
        if step != self.step:  # the first call of a step: advance past the previous step's examples
            if self.step is not None:
                self.position += self.per_step
            if self.position + self.per_step > self.n:
                self.epoch += 1
                self.position = 0
                self.order = torch.randperm(self.n, generator=self.generator)
            self.step = step
        start = self.position + (micro * world + rank) * self.batch_size
        return self.collate(self.order[start:start + self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "step": self.step, "order": self.order.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.step = int(state["epoch"]), int(state["position"]), state["step"]
        self.order = state["order"].clone()
        self.generator.set_state(state["generator"])
