"""Request and response bodies of the OpenAI-compatible API.

Every model forbids unknown fields: a field this server does not implement is a 400 naming it,
never silently dropped. Fields that clients send but that have one meaningful value here (for
example `suffix`, `tools`) are declared, and anything but their neutral value is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from server.interventions.spec import MAX_INTERVENTIONS, InterventionSpec

TokenId = Annotated[int, Field(ge=0)]


class FieldConflict(ValueError):
    """A check across fields that fails: names the field the error's `param` reports (a model
    validator's error has no location of its own)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # larger than the vocabulary = off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: StrictBool = False
    min_tokens: int = Field(0, ge=0)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    # neuronserve: WINA sparsity for this request (0 = dense; None = the server's default_sparsity)
    sparsity: float | None = Field(None, ge=0.0, le=0.9)
    # neuronserve: per-request interventions (DESIGN.md); None = the server's default_interventions
    interventions: list[InterventionSpec] | None = Field(None, max_length=MAX_INTERVENTIONS)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > 1024:
            raise ValueError("at most 1024 logit_bias entries")
        for key, bias in value.items():
            try:
                token = int(key)
            except ValueError:
                raise ValueError(f"logit_bias key {key!r} is not a token id") from None
            if token < 0:
                raise ValueError(f"logit_bias key {key!r} is not a token id")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias value for token {key} must be in [-100, 100]")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.best_of is not None and self.best_of != self.n:
            raise FieldConflict("best_of", "best_of other than n is not supported")
        if self.stream_options is not None and not self.stream:
            raise FieldConflict("stream_options", "stream_options is only allowed with stream: true")
        return self


PromptType = Union[str, list[str], list[Annotated[int, Field(strict=True)]], list[list[Annotated[int, Field(strict=True)]]]]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    echo: StrictBool = False
    logprobs: int | None = Field(None, ge=0)
    suffix: None = Field(None, description="Not supported: must be null.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value):
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(StrictModel):
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = Field(None, max_length=0, description="Tool calling is not supported.")
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False

    @model_validator(mode="after")
    def _chat_consistent(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise FieldConflict("max_completion_tokens", "set max_tokens or max_completion_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldConflict("top_logprobs", "top_logprobs needs logprobs: true")
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldConflict("continue_final_message", "continue_final_message needs add_generation_prompt: false")
        return self


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise FieldConflict("prompt" if self.prompt is None else "messages", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(strict=True)]]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
