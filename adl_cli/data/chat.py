"""Conversations: the chat template and the JSONL shapes supervised fine-tuning reads.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
The template writes each message as ``<role marker> content <end>``, the markers being special
tokens added to the tokenizer (ids after its last one; the model's embedding grows by as many
rows, initialised to the mean of the old ones). Content is encoded as ordinary text, so a
message that spells ``<|user|>`` cannot forge a marker. A reply is prompted with the
assistant's marker and ends with ``<end>``: that token is the chat model's end of sequence,
trained like any answer token, so generation stops by itself (padding never shares its id:
padded targets are -100, not a token).

``render`` gives the ids and, per id, whether it is a training target (the assistant's content
and its ``<end>``; everything with ``train_on_prompt``); ``parse`` reads ids back into messages.
The template is stored in the run's ``tokenizer.json`` (``chat``) and exported to transformers
as a Jinja chat template.

JSONL input: one JSON object a line, either Alpaca's ``{"instruction", "input", "output"}``
(``input`` may be empty or absent) or ``{"messages": [{"role", "content"}, ...]}``. A
malformed line is an error naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adl_cli.errors import AdlError

ROLES = ("system", "user", "assistant")


@dataclass
class TemplateSection:
    """The recipe's ``[template]``: the marker texts (added as special tokens) and a default
    system message (empty: none)."""

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"
    default_system: str = ""

    def markers(self) -> dict[str, str]:
        return {"system": self.system, "user": self.user, "assistant": self.assistant, "end": self.end}


class ChatTemplate:
    """Markers as special-token ids of ``tokenizer`` (which must hold them: ``attach``)."""

    def __init__(self, tokenizer, markers: dict[str, str], default_system: str = ""):
        self.tokenizer = tokenizer
        self.markers = dict(markers)
        self.default_system = default_system
        try:
            self.ids = {role: tokenizer.special_id(text) for role, text in self.markers.items()}
        except KeyError as e:
            raise AdlError(f"the tokenizer has no special token {e.args[0]!r}: the chat template cannot be expressed with it") from None
        self.role_of = {self.ids[r]: r for r in ROLES}

    # ---------------------------------------------------------------- building

    @staticmethod
    def attach(tokenizer, section: TemplateSection):
        """(tokenizer with the markers as special tokens, template); refuses markers the tokenizer
        cannot hold apart (empty, repeated, the end-of-text token, or text with a newline)."""
        markers = section.markers()
        texts = list(markers.values())
        for role, text in markers.items():
            if not text or not text.strip() or any(c in text for c in "\r\n"):
                raise AdlError(f"template.{role} = {text!r}: a marker must be non-blank text on one line")
            if text == "<|endoftext|>":
                raise AdlError(f"template.{role}: <|endoftext|> is the pretraining separator; pick another marker")
        if len(set(texts)) != len(texts):
            raise AdlError(f"template: the markers must differ, got {texts}")
        for role, text in markers.items():
            if text in tokenizer.specials and tokenizer.chat and tokenizer.chat.get("markers", {}).get(role) != text:
                raise AdlError(f"template.{role} = {text!r} is already another special token of this tokenizer")
        tok = tokenizer.with_specials(texts)
        template = ChatTemplate(tok, markers, section.default_system)
        tok.chat = template.describe()
        return tok, template

    @staticmethod
    def of(tokenizer) -> ChatTemplate | None:
        """The template stored with a run's tokenizer, or None (a base model)."""
        if not tokenizer.chat:
            return None
        chat = tokenizer.chat
        markers = chat.get("markers") if isinstance(chat, dict) else None
        if not isinstance(markers, dict) or set(markers) != {*ROLES, "end"}:
            raise AdlError("the run's tokenizer.json has a malformed 'chat' entry (markers for system, user, assistant and end)")
        return ChatTemplate(tokenizer, markers, chat.get("default_system", ""))

    def describe(self) -> dict:
        return {"format": "adl-chat-1", "markers": dict(self.markers), "default_system": self.default_system,
                "single_digits": bool(self.tokenizer.single_digits)}

    # ---------------------------------------------------------------- ids

    @property
    def end_id(self) -> int:
        return self.ids["end"]

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a reply: the template's end and the pretraining separator."""
        return {self.ids["end"], self.tokenizer.eot_id}

    def render(self, messages: list[dict], *, train_on_prompt: bool = False, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, trained): each message as marker + content + end; ``trained[i]`` says whether id i
        is a target the loss counts (assistant content and its end; all with train_on_prompt).
        ``add_generation_prompt`` appends the assistant's marker (a prompt for a reply)."""
        messages = self._checked(messages)
        enc = [self.tokenizer.encode(m["content"]) for m in messages]
        return self._assemble(messages, enc, train_on_prompt, add_generation_prompt)

    def render_many(self, conversations: list[list[dict]], *, train_on_prompt: bool = False) -> list[tuple[list[int], list[bool]]]:
        """``render`` of many conversations, their texts encoded in one batch."""
        conversations = [self._checked(c) for c in conversations]
        enc = iter(self.tokenizer.encode_batch([m["content"] for c in conversations for m in c]))
        return [self._assemble(c, [next(enc) for _ in c], train_on_prompt, False) for c in conversations]

    def _checked(self, messages: list[dict]) -> list[dict]:
        check_messages(messages, "messages")
        if self.default_system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        return messages

    def _assemble(self, messages, enc, train_on_prompt: bool, add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        trained: list[bool] = []
        for m, content in zip(messages, enc):
            answer = m["role"] == "assistant"
            ids.append(self.ids[m["role"]])
            trained.append(train_on_prompt)
            ids.extend(int(i) for i in content)
            ids.append(self.end_id)
            trained.extend([answer or train_on_prompt] * (len(content) + 1))
        if add_generation_prompt:
            ids.append(self.ids["assistant"])
            trained.append(False)
        return ids, trained

    def prompt(self, messages: list[dict]) -> list[int]:
        """The ids that ask for the next assistant reply."""
        return self.render(messages, add_generation_prompt=True)[0]

    def question(self, text: str) -> list[int]:
        """The ids that ask one user message and prompt the reply."""
        return self.prompt([{"role": "user", "content": text}])

    def parse(self, ids) -> list[dict]:
        """Messages back from rendered ids (a reply in progress, without its end, is kept)."""
        out: list[dict] = []
        role, buf = None, []
        for i in [int(i) for i in ids]:
            if i in self.role_of:
                if role is not None:
                    raise ValueError(f"a {self.role_of[i]} marker inside an unfinished {role} message")
                role, buf = self.role_of[i], []
            elif i == self.end_id:
                if role is None:
                    raise ValueError("an end marker outside a message")
                out.append({"role": role, "content": self.tokenizer.decode(buf)})
                role = None
            elif role is not None:
                buf.append(i)
            else:
                raise ValueError("text outside a message")
        if role is not None:
            out.append({"role": role, "content": self.tokenizer.decode(buf)})
        return out

    def jinja(self) -> str:
        """The template in transformers' chat-template language (Jinja)."""
        m = {k: json.dumps(v) for k, v in self.markers.items()}
        system = ""
        if self.default_system:
            system = (f"{{% if messages[0]['role'] != 'system' %}}{{{{ {m['system']} + {json.dumps(self.default_system)} + {m['end']} }}}}"
                      "{% endif %}")
        return (system + "{% for message in messages %}"
                f"{{% if message['role'] == 'system' %}}{{{{ {m['system']} }}}}"
                f"{{% elif message['role'] == 'user' %}}{{{{ {m['user']} }}}}"
                f"{{% else %}}{{{{ {m['assistant']} }}}}{{% endif %}}"
                f"{{{{ message['content'] + {m['end']} }}}}"
                "{% endfor %}"
                f"{{% if add_generation_prompt %}}{{{{ {m['assistant']} }}}}{{% endif %}}")


def check_messages(messages, where: str) -> None:
    """A conversation: a list of {role, content} with known roles, a system message only first."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}[{k}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{k}]: unknown role {m['role']!r} (system, user or assistant)")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}[{k}].content must be a string")
        if m["role"] == "system" and k:
            raise ValueError(f"{where}[{k}]: a system message may only come first")


def from_alpaca(obj: dict) -> list[dict]:
    """Alpaca's shape as a conversation: the instruction (and its input, after a blank line) asks,
    the output answers."""
    for key in ("instruction", "output"):
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
        if not isinstance(obj[key], str):
            raise ValueError(f"field {key!r} must be a string")
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError("field 'input' must be a string")
    question = obj["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": obj["output"]}]


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file in either shape; blank lines are skipped."""
    return jsonl_records(path, conversation, what="data file", empty="examples")


def conversation(obj) -> list[dict]:
    """One JSONL object (chat or Alpaca shape) as a conversation; a ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    if "messages" in obj:
        check_messages(obj["messages"], "messages")
        if not any(m["role"] == "assistant" for m in obj["messages"]):
            raise ValueError("the conversation has no assistant message to learn")
        return obj["messages"]
    if "instruction" in obj or "output" in obj:
        return from_alpaca(obj)
    raise ValueError("expected 'messages' (chat) or 'instruction' + 'output' (Alpaca)")


def jsonl_records(path: str | Path, parse, *, what: str, empty: str) -> list:
    """``parse(obj)`` of every non-blank line's JSON of a file; a missing or unreadable file, a
    line that is not JSON and a ValueError of ``parse`` are AdlErrors naming the file (and the
    line); a file without records is one too ("holds no <empty>")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdlError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdlError(f"cannot read {path}: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise AdlError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        try:
            out.append(parse(obj))
        except ValueError as e:
            raise AdlError(f"{path}:{n}: {e}") from None
    if not out:
        raise AdlError(f"{path} holds no {empty} (an empty file)")
    return out
