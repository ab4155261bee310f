"""The OpenAI wire format thresher speaks, with its two extensions: `sparsity` and `steering`.

Request models validate types and ranges (a failure is a 400 naming the field); responses mirror OpenAI's and add
the sparsity level and steering spec that were applied.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from thresher.steering import SteeringSpec

SPARSITY_DESCRIPTION = ("thresher: fraction of projection weights to skip for this request's decode steps; one of "
                        "the artifact's calibrated levels (GET /v1/models lists them). Default: the server's "
                        "--sparsity.")
STEERING_DESCRIPTION = ("thresher: directions added to the residual stream after one decoder layer for every "
                        "token of this request: SAE features (GET /v1/steering/features) and named vectors "
                        "(GET /v1/steering/vectors), each with a strength.")


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="vLLM extension: keep generating past end-of-sequence.")
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0, description=SPARSITY_DESCRIPTION)
    steering: SteeringSpec | None = Field(default=None, description=STEERING_DESCRIPTION)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=16, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Applied(BaseModel):
    """What thresher applied to a request (echoed in every response and stream chunk)."""

    sparsity: float
    steering: SteeringSpec | None


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
