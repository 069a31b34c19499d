"""Customer examples: a data file read and checked line by line, with file:line errors.

A data file is JSONL in UTF-8, one conversation a line (or a Parquet or CSV file, one a row:
:mod:`lora_ops.data.sources` says how a row maps to a line), in either of two shapes:

* OpenAI chat fine-tuning: ``{"messages": [{"role": "user", "content": "..."}, ...]}`` with
  roles ``system``, ``user``, ``assistant`` and ``tool``, and optionally ``"tools"`` (the
  functions the conversation may call) and ``"parallel_tool_calls"``;
* prompt/completion: ``{"prompt": "...", "completion": "..."}``, read as [user, assistant].

Tool use is OpenAI's: an assistant turn may hold ``tool_calls`` (its content then null,
absent or empty), each naming a function in the line's ``tools`` with ``arguments`` as JSON
text of an object; a ``tool`` turn answers a call by ``tool_call_id``, right after the turn
that made it (or after another tool turn). :mod:`lora_ops.data.tools` checks those shapes.
An assistant turn may carry ``"weight": 0`` (or 1, the default): a turn of weight 0 is
context the model is not trained to say.

Every problem is reported, not just the first, as an :class:`InputError` carrying file, line
and field. Decisions a customer will meet:

* Keys other than those above are refused, on a line and on a message: ignoring ``"name"``
  would merge speakers, and a misplaced ``weight`` (on a user turn, say) would be ignored
  silently; refusing says so at the door. The legacy ``functions``/``function_call`` (and
  role ``function``) are refused with a pointer to ``tools``/``tool_calls``.
* A conversation starts with a user turn (after one optional system message, which must come
  first) and holds at least one assistant turn of weight 1. It may end on a user or tool turn
  after an assistant turn: that tail is context without loss, so it is kept as written.
* Blank lines are skipped but counted, so line numbers match an editor's. A UTF-8 byte-order
  mark on line 1 is dropped. A line over ``MAX_LINE_BYTES`` is refused without being parsed.
* An exact duplicate (same messages and tools after parsing, whatever the JSON formatting) is
  refused, naming the line it repeats: it would double that example's weight and could leak
  into eval.

An example's identity is its canonical JSON (:func:`canonical_json`): the dataset's sha256
and the train/eval split are taken over it, never over the bytes as written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_ops.chat import assistant_text
from lora_ops.data.fields import Issue, json_type_name, shorten, text_problem
from lora_ops.data.messages import (
    LEGACY,
    ROLES,
    Message,
    Role,
    check_message,
    is_trained,
    normalized,
)
from lora_ops.data.sources import MAX_LINE_BYTES, records
from lora_ops.data.tools import call_issues, check_tools
from lora_ops.errors import InputError

__all__ = [  # names read from here since before messages had a module of their own
    "MAX_LINE_BYTES",
    "ROLES",
    "DataError",
    "Example",
    "Message",
    "Role",
    "canonical_json",
    "content_sha256",
    "dataset_sha256",
    "is_trained",
    "json_type_name",
    "parse_examples",
    "parse_record",
    "prompt_of",
    "read_examples",
    "reference_reply",
]

_LINE_KEYS = ("messages", "tools", "parallel_tool_calls")


@dataclass(frozen=True)
class Example:
    """One validated conversation, the 1-based line it came from, and the tools it may call.

    ``tools`` holds OpenAI's function definitions as written (``{"type": "function",
    "function": {...}}``); ``parallel_tool_calls`` is the line's setting, None when unset.
    """

    messages: tuple[Message, ...]
    line: int
    tools: tuple[dict[str, Any], ...] = ()
    parallel_tool_calls: bool | None = None


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
        path: The local JSONL, Parquet or CSV file (:mod:`lora_ops.data.sources`).

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
        for number, obj, read_issues in records(path):
            example, issues = parse_record(obj, read_issues, number)
            where = number or None  # 0: the file as a whole (a Parquet file's columns)
            problems += [InputError(r, file=path, line=where, field=f) for f, r in issues]
            if example is None:
                continue
            key = canonical_json(example.messages, example.tools)
            if key in first_seen:
                reason = f"exact duplicate of line {first_seen[key]}"
                problems.append(InputError(reason, file=path, line=number))
                continue
            first_seen[key] = number
            examples.append(example)
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


def parse_record(
    obj: Any, read_issues: list[Issue], number: int
) -> tuple[Example | None, list[Issue]]:
    """A record from :func:`~lora_ops.data.sources.records` checked: (example, []) when valid,
    (None, issues) otherwise; (None, []) for a blank line."""
    if read_issues or obj is None:
        return None, read_issues
    return _read_object(obj, number)


def _read_object(obj: Any, number: int) -> tuple[Example | None, list[Issue]]:
    if not isinstance(obj, dict):
        return None, [(None, f"expected a JSON object, got {json_type_name(obj)}")]
    if "messages" in obj:
        allowed: tuple[str, ...] = _LINE_KEYS
    elif "prompt" in obj or "completion" in obj:
        allowed = ("prompt", "completion")
    else:
        found = ", ".join(map(repr, obj)) or "none"
        reason = f"expected a 'messages' list, or 'prompt' and 'completion'; found keys: {found}"
        return None, [(None, shorten(reason, 200))]
    issues: list[Issue] = [_line_key_issue(key) for key in obj if key not in allowed]
    if allowed is _LINE_KEYS:
        example, shape_issues = _read_chat(obj, number)
    else:
        example, shape_issues = _prompt_completion(obj, number)
    issues += shape_issues
    return (example if not issues else None), issues


def _line_key_issue(key: str) -> Issue:
    if key in LEGACY:
        return key, LEGACY[key]
    reason = (
        f"unknown key {shorten(repr(key))}; a line holds 'messages' (with optional 'tools' "
        "and 'parallel_tool_calls'), or 'prompt' and 'completion'"
    )
    return shorten(key), reason


def _prompt_completion(obj: dict[str, Any], number: int) -> tuple[Example | None, list[Issue]]:
    issues: list[Issue] = []
    for key in ("prompt", "completion"):
        if key not in obj:
            issues.append((key, f"missing key {key!r}"))
        elif reason := text_problem(obj[key]):
            issues.append((key, reason))
    if issues:
        return None, issues
    user = Message(role="user", content=obj["prompt"])
    return Example((user, Message(role="assistant", content=obj["completion"])), number), []


def _read_chat(obj: dict[str, Any], number: int) -> tuple[Example | None, list[Issue]]:
    """A ``messages`` line: its tools, its messages, then calls and answers across them."""
    tools, issues = check_tools(obj["tools"]) if "tools" in obj else ((), [])
    parallel = obj.get("parallel_tool_calls")
    if "parallel_tool_calls" in obj and not isinstance(parallel, bool):
        got = json_type_name(parallel)
        issues.append(("parallel_tool_calls", f"must be true or false, got {got}"))
    messages, message_issues = _check_messages(obj["messages"])
    issues += message_issues
    if messages is not None and not issues:  # names and ids are only compared once well formed
        issues += call_issues(messages, tools, parallel is not False)
    if messages is None or issues:
        return None, issues
    return Example(messages, number, tools, parallel), []


def _check_messages(raw: Any) -> tuple[tuple[Message, ...] | None, list[Issue]]:
    if not isinstance(raw, list):
        return None, [("messages", f"must be a list, got {json_type_name(raw)}")]
    if not raw:
        return None, [("messages", "holds no messages")]
    issues: list[Issue] = []
    roles: list[str | None] = []
    for i, item in enumerate(raw):
        role, item_issues = check_message(item, f"messages[{i}]")
        roles.append(role)
        issues += item_issues
    if None not in roles:  # with a role unknown, order rules would only echo that problem
        issues += _conversation_issues(roles, raw)
    if issues:
        return None, issues
    return tuple(normalized(item) for item in raw), []


def _conversation_issues(roles: list[str | None], raw: list[dict[str, Any]]) -> list[Issue]:
    """Order rules: one system message at most, first; a user turn next; a trained assistant
    turn somewhere (weight 0 on every one leaves nothing to learn)."""
    issues: list[Issue] = [
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
    elif all(item.get("weight", 1) == 0 for item in raw if item["role"] == "assistant"):
        issues.append(("messages", "every assistant turn has weight 0, so nothing to learn from"))
    return issues


def canonical_json(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] = ()) -> str:
    """The messages (and tools) as canonical JSON: sorted keys, no spaces, raw UTF-8; no newlines.

    Without tools this is the list of messages, as it was before tools were accepted, so a
    plain dataset keeps its sha256; with tools, ``{"messages": [...], "tools": [...]}``. A
    call's arguments enter as the object they encode: their spacing is formatting, not content.
    """
    plain = [_canonical_message(m) for m in messages]
    value: Any = {"messages": plain, "tools": list(tools)} if tools else plain
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _canonical_message(message: Message) -> dict[str, Any]:
    plain: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    if "tool_calls" in message:
        plain["tool_calls"] = [
            {
                "id": call["id"],
                "type": call["type"],
                "function": {
                    "name": call["function"]["name"],
                    "arguments": json.loads(call["function"]["arguments"]),
                },
            }
            for call in message["tool_calls"]
        ]
    if "tool_call_id" in message:
        plain["tool_call_id"] = message["tool_call_id"]
    if "weight" in message:
        plain["weight"] = message["weight"]
    return plain


# ---------------------------------------------------------------------------- content hash


def dataset_sha256(path: Path) -> str:
    """The content hash of a data file: what is trained on, not how the JSON was written.

    Raises:
        DataError: The file has problems (a hash of refused data would name nothing).
    """
    from lora_ops.data.scan import scan_file  # scan reads lines through this module

    scanned = scan_file(path)  # streaming: a file of any size is hashed in little memory
    if scanned.problems:
        raise DataError(scanned.problems, path)
    return scanned.sha256


def content_sha256(examples: Iterable[Example]) -> str:
    """The sha256 of the examples' canonical form, in order (what dataset_sha256 names)."""
    # Hash the canonical messages in file order rather than the raw bytes: the hash is the
    # registry's idempotency key and the dataset's S3 folder, so re-exporting the same data
    # with other whitespace, key order, escapes, line endings or blank lines (or as
    # prompt/completion instead of messages) must not retrain. Order is kept: it is content.
    digest = hashlib.sha256()
    for example in examples:
        digest.update(canonical_json(example.messages, example.tools).encode())
        digest.update(b"\n")  # canonical JSON holds no raw newline, so this separates
    return digest.hexdigest()


def paired_sha256(train_sha256: str, validation_sha256: str) -> str:
    """The hash of a training file trained with a separate validation file: both contents.

    The pair, not the training file alone, names the prepared dataset and keys retraining,
    so a changed validation file is new data too.
    """
    return hashlib.sha256(f"{train_sha256}\nvalidation {validation_sha256}".encode()).hexdigest()


# ---------------------------------------------------------------------------- turns


def prompt_of(example: Example) -> list[Message]:
    """The conversation up to its first trained assistant turn: what a model is asked to answer.

    A tool example's prompt is answered with ``example.tools`` offered to the model.
    """
    for index, message in enumerate(example.messages):
        if is_trained(message):
            return list(example.messages[:index])
    return list(example.messages)


def reference_reply(example: Example) -> str:
    """The first trained assistant turn: the answer the customer wants for ``prompt_of``.

    A turn that calls tools reads as its text (if any) then one ``<tool_call>`` block per
    call, as :mod:`lora_ops.chat` writes calls for a template that takes no tools.
    """
    return assistant_text(next(m for m in example.messages if is_trained(m)))
