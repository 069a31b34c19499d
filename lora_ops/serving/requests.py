"""OpenAI's request bodies, checked at the door: every field honoured or refused.

Each field of OpenAI's completion and chat-completion requests is either implemented or
declared here and refused (400, ``param`` naming it) when it asks for what a replica does
not do; a refused field sent at its neutral value (``null``, ``false``, ``"text"``...) is
accepted, as clients send defaults. A field outside OpenAI's schema is refused as OpenAI
refuses it ("Unrecognized request argument supplied"), except vLLM's ``ignore_eos``, which
is implemented: vLLM's own convention (accept and log) would drop a field the client meant.
:data:`CHAT_FIELDS` and :data:`COMPLETION_FIELDS` say what happens to each, for the README
and the test that compares them with the ``openai`` package's types.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lora_ops.errors import InputError
from lora_ops.generation import SamplingParams

MAX_CHOICES = 16  # n (and best_of): the engine's batch is 16 rows by default
MAX_PROMPTS = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Fields declared only to be refused: (values that ask for nothing, why it is refused).
    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}

    @model_validator(mode="after")
    def _refuse(self) -> Any:
        for name, (neutral, why) in self.REFUSED.items():
            value = getattr(self, name)
            if value is not None and value not in neutral:
                raise InputError(why, field=name)
        return self


class _Common(_Body):
    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(
        False, description="vLLM's extra: keep generating past the end of turn (benchmarks)."
    )

    @model_validator(mode="after")
    def _check_common(self) -> Any:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            raise InputError("at most 4 non-empty strings of up to 64 characters", field="stop")
        if self.stream_options is not None and not self.stream:
            raise InputError("only allowed when stream is true", field="stream_options")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise InputError(f"keys are token ids; {key!r} is not one", field="logit_bias")
            if not -100 <= bias <= 100:
                raise InputError("biases must be between -100 and 100", field="logit_bias")
        return self

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=tuple(stops),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
        )


class StreamOptions(_Body):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


# -- /v1/completions -------------------------------------------------------------------------

_Tokens = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=32_000)]
_Text = Annotated[str, Field(min_length=1, max_length=32_000)]


class CompletionRequest(_Common):
    prompt: _Text | _Tokens | Annotated[list[_Text | _Tokens], Field(min_length=1)]
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None

    REFUSED = {"suffix": (("",), "inserting text before a suffix is not supported")}

    @model_validator(mode="after")
    def _check_completion(self) -> Any:
        prompts = self.prompts()
        if len(prompts) > MAX_PROMPTS:
            raise InputError(f"at most {MAX_PROMPTS} prompts a request", field="prompt")
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise InputError("must be at least n", field="best_of")
        if self.best_of not in (None, 1) and self.stream:
            raise InputError("best_of cannot be used with stream", field="best_of")
        if self.echo and self.logprobs is not None:
            reason = "echo with logprobs (the prompt's logprobs) is not supported"
            raise InputError(reason, field="echo")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


# -- /v1/chat/completions --------------------------------------------------------------------


class TextPart(_Body):
    type: Literal["text"]
    text: str = Field(max_length=32_000)


class RefusalPart(_Body):
    type: Literal["refusal"]
    refusal: str


class _OtherPart(BaseModel):
    """Images, audio and files: refused, this replica reads text only."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file"]

    @model_validator(mode="after")
    def _refuse(self) -> Any:
        reason = f"{self.type} content is not supported: the base reads text only"
        raise InputError(reason, field="messages")


_Content = str | list[TextPart | _OtherPart]


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=64)
    arguments: str

    @model_validator(mode="after")
    def _arguments_are_an_object(self) -> Any:
        try:
            value = json.loads(self.arguments)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise InputError("must be JSON text of an object", field="tool_calls.arguments")
        return self


class ToolCallParam(_Body):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(_Body):
    role: Literal["system", "developer"]
    content: _Content
    name: str | None = None


class UserMessage(_Body):
    role: Literal["user"]
    content: _Content
    name: str | None = None


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None

    REFUSED = {
        "function_call": ((), "deprecated by OpenAI: send tool_calls"),
        "audio": ((), "audio is not supported: the base reads text only"),
    }


class ToolMessage(_Body):
    role: Literal["tool"]
    content: _Content
    tool_call_id: str = Field(min_length=1, max_length=256)


class FunctionMessage(BaseModel):
    role: Literal["function"]

    @model_validator(mode="after")
    def _refuse(self) -> Any:
        reason = "the function role is deprecated by OpenAI: use tool messages"
        raise InputError(reason, field="messages")


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> Any:
        if (self.type == "json_schema") != (self.json_schema is not None):
            reason = "json_schema is given exactly when type is json_schema"
            raise InputError(reason, field="response_format")
        return self


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    moderation: Any = None
    prompt_cache_options: Any = None

    REFUSED = {
        "prompt_cache_retention": (("in_memory",), "only in_memory prefix caching is offered"),
        "service_tier": (("auto", "default"), "one service tier is offered: default"),
        "store": ((False,), "completions are not stored"),
        "metadata": (({},), "metadata is kept with stored completions, which are not offered"),
        "modalities": ((["text"],), "the base generates text only"),
        "audio": ((), "audio output is not supported: the base generates text only"),
        "prediction": ((), "predicted outputs are not supported"),
        "reasoning_effort": ((), "the base is not a reasoning model"),
        "verbosity": ((), "the base is not a reasoning model"),
        "web_search_options": ((), "web search is not offered"),
        "functions": ((), "deprecated by OpenAI: send tools"),
        "function_call": ((), "deprecated by OpenAI: send tool_choice"),
        "moderation": ((), "moderation is not offered"),
        "prompt_cache_options": ((), "prompt cache options are not offered"),
    }

    @model_validator(mode="after")
    def _check_chat(self) -> Any:
        if self.top_logprobs is not None and not self.logprobs:
            raise InputError("needs logprobs to be true", field="top_logprobs")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise InputError("function names must be unique", field="tools")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise InputError("needs tools", field="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InputError(f"no tool is named {choice.function.name!r}", field="tool_choice")
        if self.response_format and self.response_format.type != "text" and self.forced_calls():
            reason = "cannot force tool calls and a response format at once"
            raise InputError(reason, field="tool_choice")
        return self

    def forced_calls(self) -> bool:
        """The reply must call tools (``required`` or a named function)."""
        return self.tool_choice not in (None, "none", "auto") and bool(self.tools)


StreamOptions.model_rebuild()
_Common.model_rebuild()


# -- what each field does here (the README's table; a test holds it to the openai package) --

_SHARED_FIELDS = {
    "model": "`base` or a customer's adapter; an API key reaches only its own",
    "max_tokens": "honoured (default: what fits, at most 64)",
    "temperature": "honoured (0 is greedy)",
    "top_p": "honoured",
    "stop": "honoured: up to 4 strings, cut from the text",
    "seed": "honoured: same seed, same sample; choice i of n uses seed + i",
    "stream": "honoured: server-sent events, `data: [DONE]` last",
    "stream_options": "`include_usage` honoured (a last chunk with usage); "
    "`include_obfuscation` honoured (random padding on each chunk)",
    "n": f"honoured, up to {MAX_CHOICES}: the choices share the prompt's prefill",
    "presence_penalty": "honoured",
    "frequency_penalty": "honoured",
    "logit_bias": "honoured: token id -> bias in [-100, 100]",
    "user": "recorded in the replica's log (`lora_ops.serving.requests`)",
}
CHAT_FIELDS = {
    **_SHARED_FIELDS,
    "messages": "roles system, developer (read as system), user, assistant (with "
    "`tool_calls`), tool; text content and text parts; images, audio and files refused; "
    "the `function` role refused (deprecated)",
    "max_completion_tokens": "honoured (as max_tokens)",
    "logprobs": "honoured: the model's own log probabilities, streamed too",
    "top_logprobs": "honoured, 0-20",
    "response_format": "`text`; `json_object` and `json_schema` enforced by constrained "
    "decoding (llguidance); a schema that cannot be enforced is a 400",
    "tools": "honoured: rendered by the base's template, or in Hermes form",
    "tool_choice": "`none`, `auto`, `required` and a named function (the last two "
    "constrained to the functions' JSON schemas)",
    "parallel_tool_calls": "honoured: false means at most one call",
    "safety_identifier": "recorded in the replica's log (`lora_ops.serving.requests`)",
    "prompt_cache_key": "accepted: prefix caching is automatic, per adapter",
    "prompt_cache_retention": "`in_memory` honoured; `24h` refused",
    "service_tier": "`auto` and `default` honoured; others refused",
    "store": "false honoured; true refused (completions are not stored)",
    "metadata": "refused unless empty (kept only with stored completions)",
    "modalities": '`["text"]` honoured; audio refused',
    "audio": "refused",
    "prediction": "refused",
    "reasoning_effort": "refused (not a reasoning model)",
    "verbosity": "refused (not a reasoning model)",
    "web_search_options": "refused",
    "functions": "refused (deprecated: send tools)",
    "function_call": "refused (deprecated: send tool_choice)",
    "moderation": "refused",
    "prompt_cache_options": "refused",
}
COMPLETION_FIELDS = {
    **_SHARED_FIELDS,
    "prompt": f"text or token ids, or a list of up to {MAX_PROMPTS} of either",
    "best_of": f"honoured, up to {MAX_CHOICES}: the n likeliest returned; not with stream",
    "echo": "honoured; with logprobs refused (prompt logprobs are not computed)",
    "logprobs": "honoured, 0-5, streamed too",
    "suffix": "refused (no fill-in-the-middle)",
}
