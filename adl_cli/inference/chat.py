"""A conversation with a model: turns kept within its context, answers streamed, Ctrl-C stops one.

A run with a chat template (``adl sft`` gives it one) is asked through it: each turn is the
user's message in its markers, then the assistant's marker, and the reply ends at the template's
end token (kept in the transcript, so the next turn reads as training did). A run without one
is plain continuation: the transcript is every turn's text in order (a new line before each of
your turns) and the model continues it. The prompt of a turn is the latest whole turns that fit
in three quarters of the context with your new text (the engine's slide policy keeps the same
share), oldest dropped first; a template's default system message always leads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adl_cli.data.chat import ChatTemplate
from adl_cli.inference.engine import TextStream, generate_batch, keep_room
from adl_cli.inference.sampling import SamplingParams

NOTE = "{run} has no chat template (adl sft gives a run one): what you type is continued as plain text"


@dataclass
class Answer:
    text: str
    tokens: list[int]
    interrupted: bool = False
    prompt_tokens: int = 0


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    params: SamplingParams
    max_new_tokens: int = 200
    seed: int = 0
    turns: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (your tokens, the answer's tokens)

    def __post_init__(self):
        self.template = ChatTemplate.of(self.tokenizer)
        self.system: list[int] = []
        if self.template is not None and self.template.default_system:
            self.system = self.template.render([{"role": "system", "content": self.template.default_system}])[0]

    def reset(self) -> None:
        self.turns.clear()

    def prompt(self, user: list[int]) -> list[int]:
        """The latest whole turns that fit, then ``user`` (its last tokens if it alone does not fit)."""
        budget = keep_room(self.model.config.block_size) - len(self.system)
        ids = user[-budget:]
        for u, a in reversed(self.turns):
            if len(u) + len(a) + len(ids) > budget:
                break
            ids = u + a + ids
        return self.system + ids

    def _user_tokens(self, text: str) -> list[int]:
        if self.template is not None:
            return self.template.question(text)
        return list(self.tokenizer.encode(("\n" if self.turns else "") + text))

    def ask(self, text: str, show=lambda piece: None) -> Answer:
        """Answer ``text``; ``show`` gets the answer's text piece by piece. Ctrl-C (KeyboardInterrupt)
        during the answer stops it there: what was said so far stays in the history."""
        tok = self.tokenizer
        user = self._user_tokens(text)
        ids = self.prompt(user)
        eos = sorted(self.template.stop_ids) if self.template is not None else tok.eot_id
        stream = TextStream(tok.decode, (), eos)
        g = torch.Generator().manual_seed(self.seed + len(self.turns))

        def on_token(row: int, token: int) -> None:
            piece = stream.push(token)
            if piece:
                show(piece)

        try:
            done = generate_batch(self.model, [ids], self.max_new_tokens, self.params, generator=[g], eos_id=eos,
                                  decode=tok.decode, on_token=on_token)[0]
            tokens = done.tokens[:-1] if done.finish == "eos" else done.tokens
            answer = Answer(done.text, tokens, prompt_tokens=len(ids))
        except KeyboardInterrupt:
            answer = Answer(tok.decode(stream.ids), list(stream.ids), interrupted=True, prompt_tokens=len(ids))
        rest = stream.finish(answer.text)
        if rest:
            show(rest)
        kept = answer.tokens + [self.template.end_id] if self.template is not None else answer.tokens  # a reply ends as in training
        self.turns.append((user, kept))
        return answer
