"""``POST /v1/embeddings``: OpenAI's embeddings API over :meth:`engine.async_llm.AsyncLLM.embed` (the last token's
final hidden state, L2-normalized unless ``normalize`` is false; see :mod:`engine.pooling`)."""

from __future__ import annotations

import base64
import sys
from array import array

import torch

from engine.async_llm import AsyncLLM
from engine.server.models import Served
from engine.server.protocol import ApiError, EmbeddingRequest
from engine.server.serving import prompt_list


def _token_lists(llm: AsyncLLM, req: EmbeddingRequest) -> list[list[int]]:
    """Each input as token ids that fit the context (truncated as ``truncate_prompt_tokens`` asks); 400 naming the
    input that cannot be embedded."""
    context = llm.engine.max_model_len
    keep = req.truncate_prompt_tokens
    if keep is not None and not (keep == -1 or 1 <= keep <= context):
        message = f"truncate_prompt_tokens must be -1 or in [1, {context}], got {keep}"
        raise ApiError(400, message, "truncate_prompt_tokens")
    token_lists = []
    for i, text in enumerate(prompt_list(req.input, "input")):
        try:
            ids = llm.engine.truncated(llm.engine.token_ids(text, f"input {i}"), keep, f"input {i}")
        except ValueError as e:
            raise ApiError(400, str(e), "input") from None
        if len(ids) > context:
            raise ApiError(400, f"input {i} has {len(ids)} tokens, more than the context of {context} "
                           "(truncate_prompt_tokens cuts it)", "input")  # fmt: skip
        token_lists.append(ids)
    return token_lists


def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: a list of floats, or base64 of little-endian float32 (what the openai client
    asks for by default)."""
    if encoding_format == "float":
        return vector.tolist()
    floats = array("f", vector.tolist())
    if sys.byteorder == "big":
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode()


async def create_embeddings(llm: AsyncLLM, model: Served, req: EmbeddingRequest) -> dict:
    width = llm.engine.config.n_embd
    if req.dimensions is not None and req.dimensions != width:
        raise ApiError(400, f"dimensions must be the model's width {width} (GPT-2 cannot shorten its embeddings), "
                       f"got {req.dimensions}", "dimensions")  # fmt: skip
    token_lists = _token_lists(llm, req)
    vectors = await llm.embed(token_lists, normalize=req.normalize, lora_request=model.lora_request)
    tokens = sum(map(len, token_lists))
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
