"""The OpenAI wire format thresher speaks, with its three extensions: `sparsity`, `steering` and `attention`.

Request models validate types and ranges (a failure is a 400 naming the field); responses mirror OpenAI's and add
the sparsity level, steering spec and attention budget that were applied.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from thresher import steering
from thresher.kernels.page_selection import MIN_BUDGET_TOKENS
from thresher.steering import MAX_FEATURES, MAX_STRENGTH, MAX_VECTORS

SPARSITY_DESCRIPTION = ("thresher: fraction of projection weights to skip for this request's decode steps; one of "
                        "the artifact's calibrated levels (GET /v1/models lists them). Default: the server's "
                        "--sparsity.")
STEERING_DESCRIPTION = ("thresher: directions added to the residual stream after one decoder layer for every "
                        "token of this request: SAE features (GET /v1/steering/features) and named vectors "
                        f"(GET /v1/steering/vectors), each with a strength: at most {MAX_FEATURES} features and "
                        f"{MAX_VECTORS} vectors, strengths finite and within ±{MAX_STRENGTH:g}. A feature may be "
                        "clamped instead (`clamp`: its activation set to the value, 0 removes it; a feature clamped "
                        "twice ends at the last value).")
ATTENTION_DESCRIPTION = ("thresher: KV-cache tokens each decode step of this request reads (`budget`; 0 = dense "
                         "attention). The first and newest pages are always read, the rest chosen per step by how "
                         "much attention they can draw; a context within the budget, and every prompt, is read "
                         "whole. Rounded down to whole KV pages (GET /v1/models gives their size). Default: the "
                         "server's --attention-budget.")


def _integral(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds):
    """JSON Schema's integer: 2 and 2.0, never true or "2"; bounds (ge, le...) bind the int itself, so that the
    OpenAPI document shows them as minimum and maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Integer = integer()
StopString = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    """A part of a request: a field thresher does not know is a 400 naming it, never silently ignored, and a value
    of the wrong JSON type is a 400 too, never coerced (a number is no bool, a string no number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class FeatureTerm(steering.FeatureTerm, Strict):
    id: Integer = Field(description=steering.FeatureTerm.model_fields["id"].description)


class VectorTerm(steering.VectorTerm, Strict):
    pass


class SteeringSpec(steering.SteeringSpec, Strict):
    __doc__ = steering.SteeringSpec.__doc__
    layer: Integer | None = Field(default=None, description=steering.SteeringSpec.model_fields["layer"].description)
    features: list[FeatureTerm] = Field(default_factory=list)
    vectors: list[VectorTerm] = Field(default_factory=list)


class AttentionOptions(Strict):
    budget: integer(ge=0, le=2**31) = Field(
        description=f"KV-cache tokens read per decode step: 0 (dense attention) or at least {MIN_BUDGET_TOKENS}.",
        json_schema_extra={"anyOf": [{"const": 0}, {"minimum": MIN_BUDGET_TOKENS}]})

    @field_validator("budget")
    @classmethod
    def _selectable(cls, budget: int) -> int:
        if 0 < budget < MIN_BUDGET_TOKENS:
            raise ValueError(f"a budget of {budget} tokens leaves no page to choose: send 0 (dense attention) or at "
                             f"least {MIN_BUDGET_TOKENS}")
        return budget


# vLLM samples one choice greedily: n > 1 needs a temperature above 0
GREEDY_IS_ONE_CHOICE = {"if": {"required": ["temperature"], "properties": {"temperature": {"const": 0}}},
                        "then": {"properties": {"n": {"const": 1}}}}


@dataclass(frozen=True)
class Needs:
    """A field that has an effect only together with another (OpenAI refuses it alone): given and not null without
    `other`, it is a 400 naming `field`. `other_schema` is what `other` must then be, for the OpenAPI document."""

    field: str
    other: str
    other_schema: dict
    wanted: str

    def schema(self) -> dict:
        return {"if": {"required": [self.field], "properties": {self.field: {"not": {"type": "null"}}}},
                "then": {"required": [self.other], "properties": {self.other: self.other_schema}}}

    def validator(self):
        def check(cls, value, info: ValidationInfo):
            if value is not None and not info.data.get(self.other):
                raise ValueError(f"{self.field} needs {self.wanted}")
            return value

        return field_validator(self.field)(check)


STREAM_NEEDED = Needs("stream_options", "stream", {"const": True}, "stream: true")
LOGPROBS_NEEDED = Needs("top_logprobs", "logprobs", {"const": True}, "logprobs: true")
TOOLS_NEEDED = Needs("parallel_tool_calls", "tools", {"type": "array"}, "tools")  # the field itself holds 1+


class SamplingRequest(Strict):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": [GREEDY_IS_ONE_CHOICE, STREAM_NEEDED.schema()]})

    model: str
    max_tokens: integer(ge=1) | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: integer(ge=1, le=16) = 1
    stop: StopString | list[StopString] | None = None
    seed: integer(ge=-(2**63), lt=2**63) | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="An end-user id; logged nowhere, accepted for compatibility.")
    ignore_eos: bool = Field(default=False, description="vLLM extension: keep generating past end-of-sequence.")
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0, description=SPARSITY_DESCRIPTION)
    steering: SteeringSpec | None = Field(default=None, description=STEERING_DESCRIPTION)
    attention: AttentionOptions | None = Field(default=None, description=ATTENTION_DESCRIPTION)

    _stream_options_need_stream = STREAM_NEEDED.validator()

    @field_validator("n")
    @classmethod
    def _sampled_when_several(cls, n: int, info: ValidationInfo) -> int:
        if n > 1 and info.data.get("temperature") == 0:
            raise ValueError("n above 1 needs a temperature above 0: greedy decoding has one answer")
        return n

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str = Field(description="The call's arguments, a JSON object as a string.")


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    """Any role may leave out what it has no use for (as vLLM's server allows): a missing content is empty."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant: the tools it called.")
    tool_call_id: str | None = Field(default=None, description="tool: the call this message answers.")

    def template_message(self) -> dict:
        """The message as chat templates take it: text content, tool-call arguments as objects."""
        # parts joined as vLLM's server joins them
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        message = {"role": self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": call.type, "function": {
                "name": call.function.name, "arguments": _json_or_text(call.function.arguments)}}
                for call in self.tool_calls]
        return message


def _json_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="The arguments' JSON schema.")
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """`json_object` and `json_schema` constrain decoding (vLLM's structured outputs); `text` does not."""

    # null stands for absent, as the server reads it
    model_config = ConfigDict(json_schema_extra={"if": {"properties": {"type": {"const": "json_schema"}}},
                                                 "then": {"required": ["json_schema"],
                                                          "properties": {"json_schema": {"not": {"type": "null"}}}},
                                                 "else": {"properties": {"json_schema": {"type": "null"}}}})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        GREEDY_IS_ONE_CHOICE, STREAM_NEEDED.schema(), LOGPROBS_NEEDED.schema(), TOOLS_NEEDED.schema(),
        {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": ["none", None]}}}},
         "then": {"required": ["tools"], "properties": {"tools": {"type": "array"}}}}]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: integer(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: integer(ge=0, le=20) | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="Default: 'auto' when tools are given, else 'none'.")
    parallel_tool_calls: bool | None = None

    _top_logprobs_need_logprobs = LOGPROBS_NEEDED.validator()
    _parallel_tool_calls_need_tools = TOOLS_NEEDED.validator()

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice, info: ValidationInfo):
        tools = info.data.get("tools") or []
        if choice not in (None, "none") and not tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"'{choice.function.name}' is not among the tools")
        return choice


class CompletionRequest(SamplingRequest):
    prompt: str | list[Integer] = Field(min_length=1)
    logprobs: integer(ge=0, le=5) | None = None
    max_tokens: integer(ge=1) | None = 16


CHAT_ONLY = ("tools", "add_generation_prompt", "continue_final_message")


class TokenizeRequest(Strict):
    """vLLM's /tokenize: a `prompt` as /v1/completions tokenizes it, or `messages` as /v1/chat/completions does."""

    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["prompt"], "not": {"anyOf": [{"required": [f]} for f in ("messages", *CHAT_ONLY)]}},
                  {"required": ["messages"], "not": {"required": ["prompt"]}}],
        "if": {"required": ["continue_final_message"], "properties": {"continue_final_message": {"const": True}}},
        "then": {"required": ["add_generation_prompt"], "properties": {"add_generation_prompt": {"const": False}}}})

    model: str | None = None
    prompt: str = None  # one of prompt and messages; neither may be null
    messages: list[ChatMessage] = Field(default=None, min_length=1)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = Field(default=None, description="Default: true for a prompt, false for "
                                                                       "messages (their template adds them).")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt or messages")
        if self.prompt is not None and self.model_fields_set & set(CHAT_ONLY):
            raise ValueError(f"{', '.join(CHAT_ONLY)} go with messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt false")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[Integer] = Field(max_length=2**20)


class DetokenizeResponse(BaseModel):
    prompt: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Applied(BaseModel):
    """What thresher applied to a request (echoed in every response and stream chunk)."""

    sparsity: float
    steering: SteeringSpec | None
    attention: AttentionOptions


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
