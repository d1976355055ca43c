"""The OpenAI API's request schemas (validated with pydantic, as vLLM's ``entrypoints/openai/protocol.py``) and its
error body. Unknown fields are refused with a 400 naming them, as OpenAI does; vLLM's extra sampling fields
(``top_k``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens``, ``use_beam_search``,
``length_penalty``) are accepted."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.beam_search import BeamSearchParams
from engine.sampling_params import SamplingParams
from engine.structured_outputs import StructuredOutputsParams

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions API


class ApiError(Exception):
    """A request the server refuses: becomes OpenAI's error body with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error")


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


def error_body(message: str, type_: str, param: str | None = None, code: int | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields completions and chat completions share (OpenAI's defaults)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    truncate_prompt_tokens: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    priority: int = 0  # with serve --scheduling-policy priority: lower is served first
    cache_salt: str | None = None  # only requests of the same salt share prefix-cache blocks
    # vLLM's beam search: the n best beams, n being the beam width (transformers' algorithm and length_penalty)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs, and vLLM's older guided_* fields
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    @property
    def structured_field(self) -> str | None:
        """The one structured-outputs field the request sets (``ApiError`` when it sets several)."""
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        if self.response_format == {"type": "text"}:
            given.remove("response_format")
        if len(given) > 1:
            raise ApiError(400, f"set one of {', '.join(given)}, not several", given[1])
        return given[0] if given else None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """What :attr:`structured_field` asks for; an ``ApiError`` naming the field when it cannot be."""
        field = self.structured_field
        if field is None:
            return None
        value = getattr(self, field)
        try:
            if field == "response_format":
                return _response_format(value)
            if field == "structured_outputs":
                return StructuredOutputsParams(**value)
            return StructuredOutputsParams(**{field.removeprefix("guided_"): value})
        except (TypeError, ValueError) as e:
            raise ApiError(400, f"{field}: {' '.join(str(e).split())}", field) from None

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """As :class:`SamplingParams`; its ``ValueError`` names the field."""
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias,
            stop=self.stop or None,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            structured_outputs=self.structured_outputs_params(),
        )

    def beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        """As :class:`BeamSearchParams` (beam width ``n``); an ``ApiError`` names the field that cannot be."""
        unsupported = {"stream": self.stream, "stop": self.stop, "stop_token_ids": self.stop_token_ids,
                       "cache_salt": self.cache_salt,
                       "logit_bias": self.logit_bias, "allowed_token_ids": self.allowed_token_ids,
                       "bad_words": self.bad_words,
                       "presence_penalty": self.presence_penalty,
                       "frequency_penalty": self.frequency_penalty, "min_tokens": self.min_tokens,
                       "repetition_penalty": self.repetition_penalty not in (None, 1.0)}  # fmt: skip
        if self.structured_field is not None:
            unsupported[self.structured_field] = True
        for name, value in unsupported.items():
            if value:
                raise ApiError(400, f"{name} is not supported with use_beam_search", name)
        try:
            return BeamSearchParams(self.n, max_tokens, ignore_eos=self.ignore_eos, length_penalty=self.length_penalty)
        except ValueError as e:  # beam_width is the API's n
            message = str(e).replace("beam_width", "n")
            raise ApiError(400, message, message.split()[0]) from None


STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice")


def _response_format(value: dict) -> StructuredOutputsParams | None:
    """OpenAI's ``response_format``: ``{"type": "json_object"}``, or ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}}``."""
    kind = value.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema" and isinstance(value.get("json_schema"), dict) and "schema" in value["json_schema"]:
        return StructuredOutputsParams(json=value["json_schema"]["schema"])
    raise ValueError('expected {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                     '{"name": ..., "schema": {...}}}')  # fmt: skip


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None  # not supported (GPT-2 does not infill); refused when set
    best_of: int | None = None  # only best_of == n (no server-side reranking)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool fields...: passed to the template as they are
    role: str
    content: str | None = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions`` (served only with ``--chat-template``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's fields, and vLLM's ``normalize`` and ``truncate_prompt_tokens``."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    normalize: bool = True
    truncate_prompt_tokens: int | None = None


class LoadLoRAAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's): serve the PEFT adapter at ``lora_path`` as model ``lora_name``."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter``: stop serving ``lora_name`` (vLLM's ``lora_int_id`` is accepted, unused)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


FinishReason = Literal["stop", "length", "abort"] | None
