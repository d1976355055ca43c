"""transformers-compatible ``pipeline("text-generation")`` and ``set_seed``, so the GPT-2 model card's snippet
runs unchanged::

    from engine import pipeline, set_seed
    generator = pipeline("text-generation", model="gpt2-medium")
    set_seed(42)
    generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5)
"""

from __future__ import annotations

import random

import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams

# GPT-2's generation_config.json / task_specific_params["text-generation"]: sample, top-k 50, 50 tokens in all.
DEFAULT_MAX_LENGTH = 50
DEFAULT_TOP_K = 50


def set_seed(seed: int) -> None:
    """Seed Python's and torch's global generators (unseeded sampling draws from torch's)."""
    random.seed(seed)
    torch.manual_seed(seed)


class TextGenerationPipeline:
    """Callable like transformers' text-generation pipeline; returns ``[{"generated_text": ...}, ...]``."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def __call__(
        self,
        text_inputs: str | list[str],
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        num_return_sequences: int = 1,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = DEFAULT_TOP_K,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        return_full_text: bool = True,
        return_tensors: bool = False,
        seed: int | None = None,
    ) -> list[dict] | list[list[dict]]:
        """Generate like transformers' pipeline; ``return_tensors=True`` gives ``generated_token_ids`` instead."""
        single = isinstance(text_inputs, str)
        prompts = [text_inputs] if single else list(text_inputs)
        tok = self.llm.get_tokenizer()
        params = []
        for prompt in prompts:
            n_prompt = len(tok.encode(prompt))
            if max_new_tokens is None:
                # transformers: max_length counts the prompt
                limit = DEFAULT_MAX_LENGTH if max_length is None else max_length
                new = limit - n_prompt
                if new < 1:
                    raise ValueError(f"max_length={limit} leaves no room after the prompt's {n_prompt} tokens")
            else:
                new = max_new_tokens
            params.append(
                SamplingParams(
                    n=num_return_sequences,
                    max_tokens=new,
                    temperature=temperature if do_sample else 0.0,
                    top_k=top_k if top_k is not None else 0,
                    top_p=top_p,
                    repetition_penalty=repetition_penalty,
                    seed=seed,
                )
            )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for prompt, out in zip(prompts, outputs):
            if return_tensors:  # transformers: the prompt's ids followed by the new ones
                results.append([{"generated_token_ids": out.prompt_token_ids + c.token_ids} for c in out.outputs])
            else:
                results.append([{"generated_text": (prompt if return_full_text else "") + c.text} for c in out.outputs])
        return results[0] if single else results


def pipeline(task: str = "text-generation", model: str = "gpt2-medium", **llm_kwargs) -> TextGenerationPipeline:
    """``transformers.pipeline`` for the one task this engine serves; ``llm_kwargs`` go to :class:`LLM`."""
    if task != "text-generation":
        raise ValueError(f"task {task!r} is not supported; only 'text-generation'")
    return TextGenerationPipeline(LLM(model, **llm_kwargs))
