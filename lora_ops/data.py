"""Customer training data: JSONL checks with file:line errors; chat template, masking, split, hash.

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

Loss is taken on assistant turns only: each turn's content and the end-of-turn marker the
chat template writes after it (``<|im_end|>`` for ChatML), found by rendering prefixes of
the conversation, so any template whose prefix renderings are prefixes of the whole works.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypedDict

from jinja2.exceptions import TemplateError

from lora_ops.errors import InputError

if TYPE_CHECKING:  # only for hints: importing this module stays cheap (CLI start-up)
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MIN_EXAMPLES = 10
MAX_LINE_BYTES = 1 << 20  # 1 MiB: far above any sane example, small enough to hold in memory
IGNORE_INDEX = -100  # the label transformers' loss functions skip
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


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels of one example; ``labels`` is -100 where no loss is taken.

    Labels are not shifted: transformers' causal-LM loss shifts them itself.
    """

    input_ids: list[int]  # (seq,)
    labels: list[int]  # (seq,)
    line: int


@dataclass(frozen=True)
class PreparedDataset:
    """A tokenized, split dataset and where it came from."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    sha256: str  # dataset_sha256 of the source file
    source: str
    max_seq_len: int


@dataclass
class ValidationReport:
    """What validate_file found in one file."""

    path: str
    examples: int
    problems: list[InputError]
    token_counts: list[int] = field(default_factory=list)
    too_long: int = 0
    max_seq_len: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """Flat figures for a CLI table or run parameters; token figures are None untokenized."""
        counts = self.token_counts
        return {
            "path": self.path,
            "examples": self.examples,
            "tokens_min": min(counts) if counts else None,
            "tokens_median": statistics.median(counts) if counts else None,
            "tokens_max": max(counts) if counts else None,
            "too_long": self.too_long,
            "max_seq_len": self.max_seq_len,
            "problems": len(self.problems),
            "ok": self.ok,
        }


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
            key = _canonical(messages)
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


def _canonical(messages: Sequence[Message]) -> str:
    """The messages as canonical JSON: sorted keys, no spaces, raw UTF-8; no newlines."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return json.dumps(plain, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------- checking


def validate_file(
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_seq_len: int = 512,
    min_examples: int = MIN_EXAMPLES,
) -> ValidationReport:
    """Check a data file without raising on its contents.

    Args:
        path: The local JSONL file.
        tokenizer: When given, each example is rendered and tokenized, counted and checked
            against ``max_seq_len``; the chat template is checked too.
        max_seq_len: Most tokens an example may have after the chat template.
        min_examples: Fewest valid examples the file must hold.

    Returns:
        The report; ``report.ok`` is True when no problem was found.

    Raises:
        InputError: The file cannot be read at all.
    """
    examples, tokenized, problems = _check_file(path, tokenizer, max_seq_len, min_examples)
    counts = [len(item.input_ids) for item in tokenized]
    return ValidationReport(
        path=str(path),
        examples=len(examples),
        problems=problems,
        token_counts=counts,
        too_long=sum(count > max_seq_len for count in counts),
        max_seq_len=max_seq_len if tokenizer is not None else None,
    )


def _check_file(
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None,
    max_seq_len: int,
    min_examples: int,
) -> tuple[list[Example], list[TokenizedExample], list[InputError]]:
    """Parse, tokenize and count: examples, their tokenizations, every problem by line."""
    path = Path(path)
    examples, problems = parse_examples(path)
    tokenized: list[TokenizedExample] = []
    if tokenizer is not None:
        tokenized = _tokenize_all(path, tokenizer, examples, max_seq_len, problems)
    if 0 < len(examples) < min_examples:
        reason = f"only {len(examples)} valid examples; at least {min_examples} are needed"
        problems.append(InputError(reason, file=path))
    problems.sort(key=lambda p: (p.line is None, p.line or 0))  # stable: keeps order on a line
    return examples, tokenized, problems


def _tokenize_all(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_seq_len: int,
    problems: list[InputError],
) -> list[TokenizedExample]:
    """Tokenize every example, adding template and too-long problems to ``problems``."""
    tokenized = []
    for example in examples:
        try:
            item = tokenize_example(tokenizer, example)
        except InputError as e:  # raised without a file: attach this one
            problems.append(InputError(e.reason, file=path, line=e.line, field=e.field))
            continue
        tokenized.append(item)
        if len(item.input_ids) > max_seq_len:
            reason = (
                f"{len(item.input_ids)} tokens after the chat template, "
                f"over max_seq_len {max_seq_len}"
            )
            problems.append(InputError(reason, file=path, line=example.line))
    return tokenized


# ---------------------------------------------------------------------------- tokenizing


def tokenize_example(tokenizer: PreTrainedTokenizerBase, example: Example) -> TokenizedExample:
    """Render one conversation with the chat template, tokenize it and mask non-assistant text.

    A token is a target when it starts inside an assistant span (the turn's content and the
    end-of-turn marker after it). A token straddling a span's start is left out: generation
    starts exactly there, so the model never emits it. One straddling its end is kept: the
    model must learn to emit the whole marker.

    Raises:
        InputError: The tokenizer is not a fast one, or its chat template refuses the
            conversation, does not render prefixes as prefixes, or leaves no assistant token.
    """
    if not tokenizer.is_fast:
        raise InputError("a fast tokenizer is needed (for offsets)", field="tokenizer")
    messages = [{"role": m["role"], "content": m["content"]} for m in example.messages]
    text = _render(tokenizer, messages, example.line)
    spans = _assistant_spans(tokenizer, messages, text, example.line)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _) in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    if all(label == IGNORE_INDEX for label in labels):
        reason = "the chat template left no assistant token to learn from"
        raise InputError(reason, line=example.line, field="chat_template")
    return TokenizedExample(input_ids=input_ids, labels=labels, line=example.line)


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    line: int,
    generation_prompt: bool = False,
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as e:
        reason = f"the chat template refused this conversation: {e}"
        raise InputError(reason, line=line, field="chat_template") from e
    if not isinstance(text, str):
        raise InputError("the chat template did not render text", line=line, field="chat_template")
    return text


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str, line: int
) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant turn in ``text``.

    start: the end of messages[:i] rendered with the generation prompt; end: the end of
    messages[:i+1] rendered, less trailing whitespace (the newline after ``<|im_end|>`` is
    layout between turns, not something the model must say).
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], line, generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], line)
        if not (text.startswith(before) and text.startswith(through)):
            reason = (
                f"the chat template does not render messages[:{i}] as a prefix of the whole "
                "conversation, so assistant turns cannot be located for loss masking"
            )
            raise InputError(reason, line=line, field="chat_template")
        spans.append((len(before), len(through.rstrip())))
    return spans


# ---------------------------------------------------------------------------- split and hash


def _example_hash(example: Example) -> int:
    return int(hashlib.sha256(_canonical(example.messages).encode()).hexdigest(), 16)


def split_examples(
    examples: Sequence[Example], eval_fraction: float
) -> tuple[list[Example], list[Example]]:
    """Split by content hash, so an example's side never depends on file order or on others.

    An example goes to eval when sha256(canonical messages) / 2**256 < eval_fraction. With
    two or more examples each side gets at least one: if eval would be empty the lowest-hash
    example moves to it; if train would be empty the highest-hash one moves to it. A single
    example goes to train. Each side keeps the input order.

    Raises:
        InputError: eval_fraction is not strictly between 0 and 1.
    """
    _check_eval_fraction(eval_fraction)
    if len(examples) < 2:
        return list(examples), []
    hashes = [_example_hash(example) for example in examples]
    to_eval = [h / 2**256 < eval_fraction for h in hashes]
    if not any(to_eval):
        to_eval[hashes.index(min(hashes))] = True
    if all(to_eval):
        to_eval[hashes.index(max(hashes))] = False
    train = [e for e, is_eval in zip(examples, to_eval, strict=True) if not is_eval]
    return train, [e for e, is_eval in zip(examples, to_eval, strict=True) if is_eval]


def _check_eval_fraction(eval_fraction: float) -> None:
    if not 0 < eval_fraction < 1:
        reason = f"must be between 0 and 1 (exclusive), got {eval_fraction}"
        raise InputError(reason, field="eval_fraction")


def dataset_sha256(path: Path) -> str:
    """The content hash of a data file: what is trained on, not how the JSON was written.

    Raises:
        DataError: The file has problems (a hash of refused data would name nothing).
    """
    return _content_sha256(read_examples(path))


def _content_sha256(examples: Iterable[Example]) -> str:
    # Hash the canonical messages in file order rather than the raw bytes: the hash is the
    # registry's idempotency key and the dataset's S3 folder, so re-exporting the same data
    # with other whitespace, key order, escapes, line endings or blank lines (or as
    # prompt/completion instead of messages) must not retrain. Order is kept: it is content.
    digest = hashlib.sha256()
    for example in examples:
        digest.update(_canonical(example.messages).encode())
        digest.update(b"\n")  # canonical JSON holds no raw newline, so this separates
    return digest.hexdigest()


# ---------------------------------------------------------------------------- preparing


def prepare_dataset(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int = 512,
    eval_fraction: float = 0.1,
    min_examples: int = MIN_EXAMPLES,
    *,
    source: str | None = None,
) -> PreparedDataset:
    """Validate, tokenize, mask and split a data file; nothing is truncated.

    Args:
        path: The local JSONL file.
        tokenizer: The base model's tokenizer, with its chat template.
        max_seq_len: Most tokens an example may have; longer ones are refused, not cut.
        eval_fraction: Share of examples held out for evaluation, in (0, 1).
        min_examples: Fewest valid examples the file must hold.
        source: Where the file came from (an s3:// URI) if not ``path`` itself.

    Raises:
        DataError: Listing every problem in the file, too-long examples included.
        InputError: eval_fraction is out of range.
    """
    _check_eval_fraction(eval_fraction)
    examples, tokenized, problems = _check_file(path, tokenizer, max_seq_len, min_examples)
    if problems:
        raise DataError(problems, path)
    by_line = {item.line: item for item in tokenized}
    train, held_out = split_examples(examples, eval_fraction)
    dataset = PreparedDataset(
        train=[by_line[e.line] for e in train],
        eval=[by_line[e.line] for e in held_out],
        sha256=_content_sha256(examples),
        source=source or str(path),
        max_seq_len=max_seq_len,
    )
    log.info(
        "prepared %s: %d train, %d eval examples, sha256 %s",
        dataset.source,
        len(dataset.train),
        len(dataset.eval),
        dataset.sha256,
    )
    return dataset


def prompt_of(example: Example) -> list[Message]:
    """The conversation up to its first assistant turn: what a model is asked to answer."""
    for index, message in enumerate(example.messages):
        if message["role"] == "assistant":
            return list(example.messages[:index])
    return list(example.messages)


def reference_reply(example: Example) -> str:
    """The first assistant turn: the answer the customer wants for ``prompt_of(example)``."""
    return next(m["content"] for m in example.messages if m["role"] == "assistant")
