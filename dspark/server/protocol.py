"""OpenAI request shapes (pydantic). Unknown fields are accepted and ignored, as OpenAI does."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import JSONResponse


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   headers: dict | None = None) -> JSONResponse:
    """An error in OpenAI's shape; also an ASGI app, so the middlewares answer with it too."""
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


class OpenAIModel(BaseModel):
    # strict: JSON types are not coerced, as OpenAI's API does not ("0.5" for a number, "true" for a boolean and 1
    # for a string are 400s naming the parameter); an integer is still a valid number
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":  # only an assistant turn may carry no content
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message may carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class JSONSchemaFormat(OpenAIModel):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # OpenAI: omitting parameters defines a function that takes none
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {},
                                                      "additionalProperties": False})
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionName


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class SamplingFields(OpenAIModel):
    """Fields both completion endpoints share, plus vLLM-style extras (top_k, ignore_eos, stop_token_ids)."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100]")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="vLLM-style: > 1 discourages tokens "
                                             "already in the prompt or output")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM-style: drop tokens below min_p x the top one")
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False
    num_speculative_tokens: int | None = Field(None, ge=0, description="cap on draft tokens per step; 0 = off")
    speculative: bool | None = Field(None, description="false: this request never drafts (the same as "
                                     "num_speculative_tokens 0)")
    speculation_stats: bool = Field(False, description="add usage.speculation: drafting rounds, draft tokens "
                                    "verified, accepted, and tau (tokens per round, the bonus included)")
    slo_tokens_per_s: float | None = Field(None, ge=0, description="this user's speed target in tokens/s; requests "
                                           "behind it get priority and draft budget (0 = none)")
    deadline_s: float | None = Field(None, gt=0, description="end the request this many seconds after it arrives, "
                                     "with finish_reason 'deadline'")
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
