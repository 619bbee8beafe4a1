"""The reward family: a GPT trunk with a scalar head on the last token (InstructGPT's reward
model, Ouyang et al. 2022; Stiennon et al. 2020).

r(x, y) = w . h_last, where h_last is the final-norm hidden state of the sequence's last token (the
answer's end marker in a chat run: it has read the whole prompt and answer) and w a vector of
n_embd weights (no bias: the
Bradley-Terry loss sees only differences of rewards, so a bias would never be trained).

A reward run is an ordinary run folder with ``"family": "reward"`` in config.json: its tensors are
those of the GPT it started from plus ``score.weight``, so ``load_run`` gives it back and the RL
issue's value head can start from it. ``from_language_model`` builds one from an SFT run's GPT.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from adl_cli.models import FAMILIES, Family
from adl_cli.models.gpt import GPT, GPTConfig, upgrade_state


@dataclass
class RewardConfig(GPTConfig):
    """A GPT's config under the family name "reward" (the same keys: the trunk is a GPT)."""

    family: str = "reward"


class RewardModel(GPT):
    def __init__(self, cfg: RewardConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(cfg.n_embd + 1))
        self.score.weight._muon_excluded = True  # a head: Muon (train.optimizer = "muon") leaves it to AdamW
        # What the reward never reads stays as it came and out of the optimizer (and of DDP, which
        # refuses parameters without gradients): an untied language-model head, multi-token heads.
        unused = [self.mtp] if cfg.mtp_heads else []
        if not cfg.tie_embeddings:
            unused.append(self.lm_head)
        for module in unused:
            module.requires_grad_(False)

    def forward(self, idx, targets=None, state=None, segment_ids=None, last=None):
        """With ``last`` (B,): the rewards (B,) (through ``__call__``, so DDP sees the forward);
        without, the language model's (logits, loss) as a GPT."""
        if last is not None:
            return self.rewards(idx, last)
        return super().forward(idx, targets, state, segment_ids)

    def rewards(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The reward (B,) of each row of ``idx`` (B, T), read at position ``last`` (B,): the row's
        last real token (rows are right-padded; a causal trunk never reads the padding after it)."""
        h = self.hidden(idx)
        rows = torch.arange(idx.shape[0], device=idx.device)
        return self.score(h[rows, last]).squeeze(-1).float()


def from_language_model(model: GPT) -> RewardModel:
    """A reward model holding ``model``'s weights (its trunk, the unused LM head tied or kept) and
    a freshly initialised score head."""
    cfg = RewardConfig(**{f.name: getattr(model.config, f.name) for f in dataclasses.fields(GPTConfig) if f.name != "family"})
    reward = RewardModel(cfg)
    state = {k: v for k, v in model.state_dict().items()}
    missing, unexpected = reward.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"score.weight"}:
        raise ValueError(f"the language model does not fit a reward trunk: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return reward.to(next(model.parameters()).device)


FAMILIES.register("reward")(Family(RewardConfig, build=RewardModel, upgrade_state=upgrade_state, language_model=False))
