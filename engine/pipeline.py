"""transformers-compatible ``pipeline("text-generation")`` and ``set_seed``, so the GPT-2 model card's snippet
runs unchanged::

    from engine import pipeline, set_seed
    generator = pipeline("text-generation", model="gpt2-medium")
    set_seed(42)
    generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5)

and ``pipeline("feature-extraction")``, whose output is transformers' too (``[1, T, d_model]`` per text).
``pipeline("text-generation", model="gpt2-xl", assistant_model="gpt2")`` drafts with gpt2 (speculative decoding).
"""

from __future__ import annotations

import dataclasses
import random

import torch

from engine.beam_search import BeamSearchParams, generated
from engine.llm import LLM
from engine.sampling_params import SamplingParams

# GPT-2's generation_config.json / task_specific_params["text-generation"]: sample, top-k 50, 50 tokens in all.
DEFAULT_MAX_LENGTH = 50
DEFAULT_TOP_K = 50
ASSISTANT_TOKENS = 5  # drafts a step with an assistant_model (vLLM's documented example; transformers adapts it)


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
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        return_full_text: bool = True,
        return_tensors: bool = False,
        seed: int | None = None,
    ) -> list[dict] | list[list[dict]]:
        """Generate like transformers' pipeline; ``return_tensors=True`` gives ``generated_token_ids`` instead.

        ``num_beams > 1`` with ``do_sample=False`` is beam search (:meth:`LLM.beam_search`, transformers'
        algorithm, ``length_penalty`` and ``early_stopping``): the ``num_return_sequences`` best beams.
        ``no_repeat_ngram_size`` bans repeated n-grams in either way of generating, as transformers does."""
        single = isinstance(text_inputs, str)
        prompts = [text_inputs] if single else list(text_inputs)
        tok = self.llm.get_tokenizer()
        prompt_ids = [tok.encode(prompt) for prompt in prompts]
        new_tokens = [_new_tokens(len(ids), max_length, max_new_tokens) for ids in prompt_ids]
        if num_beams != 1:
            _check_beam_arguments(num_beams, num_return_sequences, do_sample, repetition_penalty)
            beams = BeamSearchParams(num_beams, 1, length_penalty=length_penalty, early_stopping=early_stopping,
                                     no_repeat_ngram_size=no_repeat_ngram_size)  # fmt: skip
            completions = self._beam_search(prompt_ids, new_tokens, beams, num_return_sequences)
        else:
            params = [
                SamplingParams(
                    n=num_return_sequences,
                    max_tokens=new,
                    temperature=temperature if do_sample else 0.0,
                    top_k=top_k if top_k is not None else 0,
                    top_p=top_p,
                    min_p=min_p or 0.0,
                    repetition_penalty=repetition_penalty,
                    no_repeat_ngram_size=no_repeat_ngram_size,
                    seed=seed,
                )
                for new in new_tokens
            ]
            outputs = self.llm.generate(prompt_ids, params, use_tqdm=False)
            completions = [[(c.token_ids, c.text) for c in out.outputs] for out in outputs]
        results = []
        for prompt, ids, samples in zip(prompts, prompt_ids, completions):
            if return_tensors:  # transformers: the prompt's ids, the new ones, EOS (GPT-2's pad) up to the longest
                longest = max(len(new) for new, _ in samples)
                pad = [self.llm.config.eos_token_id]
                results.append([{"generated_token_ids": ids + new + pad * (longest - len(new))} for new, _ in samples])
            else:
                results.append([{"generated_text": (prompt if return_full_text else "") + text} for _, text in samples])
        return results[0] if single else results

    def _beam_search(self, prompt_ids, new_tokens, params, num_return_sequences) -> list[list[tuple[list[int], str]]]:
        """Per prompt, its best beams' ``(new token ids, their text)``; one search per distinct ``max_tokens``."""
        tok = self.llm.get_tokenizer()
        completions: list = [None] * len(prompt_ids)
        for new in sorted(set(new_tokens)):
            group = [i for i, n in enumerate(new_tokens) if n == new]
            searched = self.llm.beam_search([prompt_ids[i] for i in group], dataclasses.replace(params, max_tokens=new),
                                            use_tqdm=False)  # fmt: skip
            for i, out in zip(group, searched):
                best = out.sequences[:num_return_sequences]
                completions[i] = [generated(seq, len(prompt_ids[i]), tok) for seq in best]
        return completions


def _new_tokens(num_prompt_tokens: int, max_length: int | None, max_new_tokens: int | None) -> int:
    """How many tokens to generate: ``max_new_tokens``, else what ``max_length`` (which counts the prompt, as in
    transformers) leaves."""
    if max_new_tokens is not None:
        return max_new_tokens
    limit = DEFAULT_MAX_LENGTH if max_length is None else max_length
    if limit - num_prompt_tokens < 1:
        raise ValueError(f"max_length={limit} leaves no room after the prompt's {num_prompt_tokens} tokens")
    return limit - num_prompt_tokens


def _check_beam_arguments(num_beams, num_return_sequences, do_sample, repetition_penalty) -> None:
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if do_sample:
        raise ValueError("num_beams > 1 with do_sample=True (beam sampling) is not supported; pass do_sample=False")
    if repetition_penalty != 1.0:
        raise ValueError("repetition_penalty is not supported with num_beams > 1")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} is more than num_beams={num_beams}")


class FeatureExtractionPipeline:
    """Callable like transformers' feature-extraction pipeline: each text's last hidden states, ``[1, T, d_model]``
    as nested lists (a tensor with ``return_tensors=True``); a list of those for a list of texts."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def __call__(self, inputs: str | list[str], return_tensors: bool = False):
        hidden = [states[None].cpu() for states in self.llm.features(inputs)]
        outputs = hidden if return_tensors else [states.tolist() for states in hidden]
        return outputs[0] if isinstance(inputs, str) else outputs


TASKS = {"text-generation": TextGenerationPipeline, "feature-extraction": FeatureExtractionPipeline}


def pipeline(task: str = "text-generation", model: str = "gpt2-medium", assistant_model: str | None = None,
             **llm_kwargs):  # fmt: skip
    """``transformers.pipeline`` for the tasks this engine serves (``TASKS``); ``llm_kwargs`` go to :class:`LLM`.
    ``assistant_model`` (transformers' assisted generation: a smaller GPT-2, a name or a directory) drafts for the
    text-generation pipeline, as ``speculative_config={"model": assistant_model, "num_speculative_tokens": 5}``."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; one of {list(TASKS)}")
    if assistant_model is not None:
        if task != "text-generation":
            raise ValueError(f"assistant_model drafts for text-generation, not {task!r}")
        if llm_kwargs.get("speculative_config") is not None:
            raise ValueError("pass assistant_model or speculative_config, not both")
        llm_kwargs["speculative_config"] = {"model": assistant_model, "num_speculative_tokens": ASSISTANT_TOKENS}
    return TASKS[task](LLM(model, **llm_kwargs))
