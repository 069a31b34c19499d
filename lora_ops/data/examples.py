"""Customer examples: a JSONL data file read and checked line by line, with file:line errors.

A data file is JSONL in UTF-8, one conversation a line, in either of two shapes:

* OpenAI chat fine-tuning: ``{"messages": [{"role": "user", "content": "..."}, ...]}`` with
  roles ``system``, ``user`` and ``assistant``;
* prompt/completion: ``{"prompt": "...", "completion": "..."}``, read as [user, assistant].

Every problem is reported, not just the first, as an :class:`InputError` carrying file, line
and field. Decisions a customer will meet:

* Keys other than those above are refused, on a line and on a message. Ignoring OpenAI's
  ``"weight": 0`` would silently train on turns the customer excluded, and ignoring ``"name"``
  would merge speakers; refusing says so at the door. Tool calls are not supported.
* A conversation starts with a user turn (after one optional system message, which must come
  first) and holds at least one assistant turn. It may end on a user turn after an assistant
  turn: that tail is context without loss, so it is kept as written.
* Blank lines are skipped but counted, so line numbers match an editor's. A UTF-8 byte-order
  mark on line 1 is dropped. A line over ``MAX_LINE_BYTES`` is refused without being parsed.
* An exact duplicate (same messages after parsing, whatever the JSON formatting) is refused,
  naming the line it repeats: it would double that example's weight and could leak into eval.

An example's identity is its canonical JSON (:func:`canonical_json`): the dataset's sha256
and the train/eval split are taken over it, never over the bytes as written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypedDict

from lora_ops.errors import InputError

MAX_LINE_BYTES = 1 << 20  # 1 MiB: far above any sane example, small enough to hold in memory
ROLES = ("system", "user", "assistant")

Role = Literal["system", "user", "assistant"]
_Issue = tuple[str | None, str]  # (field, reason) before a file and line are attached


class Message(TypedDict):
    """One chat turn; a plain dict, so it goes to ``apply_chat_template`` unchanged."""

    role: Role
    content: str


@dataclass(frozen=True)
class Example:
    """One validated conversation and the 1-based line it came from."""

    messages: tuple[Message, ...]
    line: int


class DataError(InputError):
    """A data file was refused; ``problems`` holds every problem found, each with file:line."""

    def __init__(self, problems: Sequence[InputError], file: str | Path | None = None) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        listing = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{count} problem{'s' * (count != 1)}:\n{listing}", file=file)

    def __reduce__(self) -> tuple[Any, ...]:  # keep .problems through pickling (Prefect states)
        return (type(self), (self.problems, self.file))


# ---------------------------------------------------------------------------- reading


def parse_examples(path: Path) -> tuple[list[Example], list[InputError]]:
    """Read a JSONL data file, collecting every problem instead of stopping at the first.

    Args:
        path: The local JSONL file.

    Returns:
        The valid examples in file order, and one InputError per problem (file, line, field).

    Raises:
        InputError: The file cannot be read at all (missing, a folder, no permission).
    """
    path = Path(path)
    examples: list[Example] = []
    problems: list[InputError] = []
    first_seen: dict[str, int] = {}
    try:
        for number, raw in _read_lines(path):
            messages, issues = _parse_line(raw, number)
            problems += [InputError(r, file=path, line=number, field=f) for f, r in issues]
            if messages is None:
                continue
            key = canonical_json(messages)
            if key in first_seen:
                reason = f"exact duplicate of line {first_seen[key]}"
                problems.append(InputError(reason, file=path, line=number))
                continue
            first_seen[key] = number
            examples.append(Example(messages, number))
    except OSError as e:
        raise InputError(f"cannot read the file: {e.strerror or e}", file=path) from e
    if not examples and not problems:
        problems.append(InputError("the file holds no examples", file=path))
    return examples, problems


def read_examples(path: Path) -> list[Example]:
    """Read a data file that must be free of problems.

    Raises:
        DataError: Listing every problem, if there is any.
    """
    examples, problems = parse_examples(path)
    if problems:
        raise DataError(problems, path)
    return examples


def _read_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, bytes without the line ending), or None for a line too long."""
    with path.open("rb") as f:
        for number in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 2)  # room for the limit and "\r\n"
            if not raw:
                return
            if len(raw) == MAX_LINE_BYTES + 2 and not raw.endswith(b"\n"):
                _skip_rest_of_line(f)
                yield number, None
                continue
            content = raw.rstrip(b"\r\n")
            yield number, content if len(content) <= MAX_LINE_BYTES else None


def _skip_rest_of_line(f: IO[bytes]) -> None:
    while (chunk := f.readline(MAX_LINE_BYTES)) and not chunk.endswith(b"\n"):
        pass


def _parse_line(raw: bytes | None, number: int) -> tuple[tuple[Message, ...] | None, list[_Issue]]:
    """Decode and check one line: (messages, []) when valid, (None, issues) otherwise."""
    if raw is None:
        return None, [(None, f"line is longer than {MAX_LINE_BYTES} bytes; not read")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [(None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")]
    if number == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None, []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [(None, f"not valid JSON: {e.msg} at column {e.colno}")]
    except RecursionError:
        return None, [(None, "not valid JSON: nested too deeply")]
    return _read_object(obj)


def _read_object(obj: Any) -> tuple[tuple[Message, ...] | None, list[_Issue]]:
    if not isinstance(obj, dict):
        return None, [(None, f"expected a JSON object, got {json_type_name(obj)}")]
    if "messages" in obj:
        allowed = {"messages"}
    elif "prompt" in obj or "completion" in obj:
        allowed = {"prompt", "completion"}
    else:
        found = ", ".join(map(repr, obj)) or "none"
        reason = f"expected a 'messages' list, or 'prompt' and 'completion'; found keys: {found}"
        return None, [(None, _shorten(reason, 200))]
    issues: list[_Issue] = [
        (
            _shorten(key),
            f"unknown key {_shorten(repr(key))}; a line holds 'messages', or 'prompt' and "
            "'completion'",
        )
        for key in obj
        if key not in allowed
    ]
    shape = _check_messages if "messages" in allowed else _prompt_completion
    messages, shape_issues = shape(obj)
    issues += shape_issues
    return (messages if not issues else None), issues


def _prompt_completion(obj: dict[str, Any]) -> tuple[tuple[Message, ...] | None, list[_Issue]]:
    issues: list[_Issue] = []
    for key in ("prompt", "completion"):
        if key not in obj:
            issues.append((key, f"missing key {key!r}"))
        elif reason := _text_problem(obj[key]):
            issues.append((key, reason))
    if issues:
        return None, issues
    user = Message(role="user", content=obj["prompt"])
    return (user, Message(role="assistant", content=obj["completion"])), []


def _check_messages(obj: dict[str, Any]) -> tuple[tuple[Message, ...] | None, list[_Issue]]:
    raw = obj["messages"]
    if not isinstance(raw, list):
        return None, [("messages", f"must be a list, got {json_type_name(raw)}")]
    if not raw:
        return None, [("messages", "holds no messages")]
    issues: list[_Issue] = []
    roles: list[str | None] = []
    for i, item in enumerate(raw):
        role, item_issues = _check_message(item, f"messages[{i}]")
        roles.append(role)
        issues += item_issues
    if None not in roles:  # with a role unknown, order rules would only echo that problem
        issues += _conversation_issues(roles)
    if issues:
        return None, issues
    return tuple(Message(role=m["role"], content=m["content"]) for m in raw), []


def _check_message(item: Any, where: str) -> tuple[str | None, list[_Issue]]:
    """Check one message; return its role when the role is valid, and the issues."""
    if not isinstance(item, dict):
        return None, [(where, f"must be an object, got {json_type_name(item)}")]
    issues: list[_Issue] = [
        (
            f"{where}.{_shorten(key)}",
            f"unknown key {_shorten(repr(key))}; only 'role' and 'content' are supported",
        )
        for key in item
        if key not in ("role", "content")
    ]
    role = item.get("role")
    if "role" not in item:
        issues.append((f"{where}.role", "missing key 'role'"))
    elif role not in ROLES:
        expected = ", ".join(ROLES)
        issues.append((f"{where}.role", f"unknown role {_shorten(repr(role))}; use {expected}"))
    if "content" not in item:
        issues.append((f"{where}.content", "missing key 'content'"))
    elif reason := _text_problem(item["content"]):
        issues.append((f"{where}.content", reason))
    return (role if role in ROLES else None), issues


def _conversation_issues(roles: list[str | None]) -> list[_Issue]:
    """Order rules: one system message at most, first; a user turn next; an assistant turn."""
    issues: list[_Issue] = [
        (f"messages[{i}].role", "a system message must come first")
        for i, role in enumerate(roles)
        if role == "system" and i > 0
    ]
    turns = [(i, role) for i, role in enumerate(roles) if role != "system"]
    if turns and turns[0][1] != "user":
        reason = "the conversation must start with a user turn (after an optional system one)"
        issues.append((f"messages[{turns[0][0]}].role", reason))
    if "assistant" not in roles:
        issues.append(("messages", "no assistant turn, so nothing to learn from"))
    return issues


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {json_type_name(value)}"
    if not value.strip():
        return "empty or whitespace-only"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800" escapes decode to lone surrogates
        return "holds an unpaired surrogate escape such as \\ud800, which is not valid Unicode"
    return None


def json_type_name(value: Any) -> str:
    """How a JSON value's type reads in an error message ("an object", "null", ...)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def canonical_json(messages: Sequence[Message]) -> str:
    """The messages as canonical JSON: sorted keys, no spaces, raw UTF-8; no newlines."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return json.dumps(plain, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------- content hash


def dataset_sha256(path: Path) -> str:
    """The content hash of a data file: what is trained on, not how the JSON was written.

    Raises:
        DataError: The file has problems (a hash of refused data would name nothing).
    """
    return content_sha256(read_examples(path))


def content_sha256(examples: Iterable[Example]) -> str:
    """The sha256 of the examples' canonical messages, in order (what dataset_sha256 names)."""
    # Hash the canonical messages in file order rather than the raw bytes: the hash is the
    # registry's idempotency key and the dataset's S3 folder, so re-exporting the same data
    # with other whitespace, key order, escapes, line endings or blank lines (or as
    # prompt/completion instead of messages) must not retrain. Order is kept: it is content.
    digest = hashlib.sha256()
    for example in examples:
        digest.update(canonical_json(example.messages).encode())
        digest.update(b"\n")  # canonical JSON holds no raw newline, so this separates
    return digest.hexdigest()


# ---------------------------------------------------------------------------- turns


def prompt_of(example: Example) -> list[Message]:
    """The conversation up to its first assistant turn: what a model is asked to answer."""
    for index, message in enumerate(example.messages):
        if message["role"] == "assistant":
            return list(example.messages[:index])
    return list(example.messages)


def reference_reply(example: Example) -> str:
    """The first assistant turn: the answer the customer wants for ``prompt_of(example)``."""
    return next(m["content"] for m in example.messages if m["role"] == "assistant")
