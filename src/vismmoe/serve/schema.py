"""The OpenAI chat-completions request as vismmoe accepts it, and OpenAI's error object.

Owns which request fields exist, their types and ranges (pydantic validates them: a wrong type is a 400 with the
field's path), which OpenAI fields are accepted only at their neutral value (`n` = 1, penalties 0, no tools, ...),
and the one extension: `top_k` and `ignore_eos` (as vLLM and llama.cpp's server spell them). Unknown fields are
refused rather than ignored, so a parameter we do not implement never passes silently. Scalars are strict: JSON
`true` is not the integer 1 nor `"yes"` a boolean (a float field still takes an integer), and message text may
not hold a NUL character. Reference:
https://platform.openai.com/docs/api-reference/chat/create
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # strict: no coercion between JSON types (true is not 1, "5" not 5, "yes" not true); floats take integers
    model_config = ConfigDict(extra="forbid", strict=True)


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("text holds a NUL character (\\u0000): remove it")
    return text


def _stop_text(text: str) -> str:
    if not text:
        raise ValueError("a stop string must not be empty: give some text, or leave it out")
    return text


StopText = Annotated[str, AfterValidator(_stop_text)]          # its own error path: "stop.1", not "stop"


class TextPart(_Strict):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v):
        return _no_nul(v)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        return _no_nul(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None:
            raise ValueError("a message needs content")
        if self.role != "user" and not isinstance(self.content, str) and \
                any(p.type == "image_url" for p in self.content):
            raise ValueError(f"images go in user messages, not {self.role} messages")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)                     # extension (vLLM, llama.cpp)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: StopText | list[StopText] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False                                           # extension (vLLM)
    # OpenAI fields accepted at their neutral value only
    n: int | None = Field(default=None, ge=1, le=1)
    presence_penalty: float | None = Field(default=None, ge=0, le=0)
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)
    logprobs: bool | None = Field(default=None)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"give at most 4 stop strings ({len(stops)} given)")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}. Text that is not Unicode (a lone
    surrogate from the request, quoted back) is escaped, so the object always encodes."""
    def text(v):
        return v if v is None else v.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": text(message), "type": kind, "param": text(param), "code": code}}
