"""``LLMEngine``: requests in and out one at a time (vLLM's engine API, nano-vllm's shape).

    engine = LLMEngine("gpt2-medium")
    engine.add_request("a", "Hello, I'm a language model,", SamplingParams(max_tokens=20))
    while engine.has_unfinished_requests():
        for out in engine.step():          # the requests that got a token, their outputs so far
            print(out.request_id, out.outputs[0].text, out.finished)

Each ``step`` schedules (:mod:`engine.scheduler`), runs the model (:mod:`engine.model_runner`), samples
(:mod:`engine.sampling`) and turns tokens into outputs (:mod:`engine.output_processor`). Requests may be added and
aborted between any two steps. ``LLM`` is the offline front over it.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import replace

import torch

from engine.block_manager import BlockManager
from engine.config import ModelConfig
from engine.cuda_graphs import StaticDecoder
from engine.device import make_ops, resolve_device, resolve_dtype
from engine.draft_model import DraftModelProposer
from engine.host_tensors import list_tensor
from engine.kv_budget import kv_budget, step_peak_bytes
from engine.kv_cache import KVCache, cdiv
from engine.lora import LoRARequest, LoRASlots
from engine.model import GPT2
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor
from engine.outputs import EngineStats, RequestOutput
from engine.sampling import Sampler, SamplingBatch, seeded_generator, token_logprobs
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.scheduler import POLICIES, Scheduler
from engine.sequence import Request, Sequence, SequenceStatus
from engine.speculative import NgramProposer, SpeculativeConfig, accepted_length, speculates

logger = logging.getLogger("gpt2_triton.engine")
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = (None, "int8", "int4")
MIN_BATCHED_TOKENS = 4096  # default per-step token budget (at least the context, and max_num_seqs)

# text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids} dicts (with an optional "cache_salt")
Prompt = str | list[int] | dict


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' * allow_none}, got {value!r}")


def _check_arguments(
    block_size, max_num_seqs, num_blocks, max_num_batched_tokens, load_format, quantization, split_special_tokens,
    enable_prefix_caching,
) -> None:  # fmt: skip
    """The engine's own arguments (the model's, dtype's and device's are checked where they are resolved)."""
    _check_positive("block_size", block_size)
    _check_positive("max_num_seqs", max_num_seqs)
    _check_positive("num_blocks", num_blocks, allow_none=True)
    _check_positive("max_num_batched_tokens", max_num_batched_tokens, allow_none=True)
    if max_num_batched_tokens is not None and max_num_batched_tokens < max_num_seqs:
        raise ValueError(
            f"max_num_batched_tokens={max_num_batched_tokens} is below max_num_seqs={max_num_seqs}: "
            "every running sequence's decode token must fit in one step"
        )
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if not isinstance(split_special_tokens, bool):
        raise ValueError(f"split_special_tokens must be a bool, got {split_special_tokens!r}")
    if not isinstance(enable_prefix_caching, bool):
        raise ValueError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")


def unwrapped(prompt: Prompt, what: str) -> tuple[str | list[int], str | None]:
    """vLLM's prompt dicts (``TextPrompt``, ``TokensPrompt``) as the text or token ids they hold, and their
    ``cache_salt`` (None for a plain prompt)."""
    if not isinstance(prompt, dict):
        return prompt, None
    keys = set(prompt) - {"cache_salt"}
    if keys not in ({"prompt"}, {"prompt_token_ids"}):
        names = sorted(map(str, prompt))
        raise ValueError(f"{what}: a prompt dict holds 'prompt' (text) or 'prompt_token_ids', got keys {names}")
    salt = prompt.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"{what}: cache_salt must be a non-empty string, got {salt!r}")
    return prompt[keys.pop()], salt


def _max_model_len(value: int | None, n_positions: int) -> int:
    """vLLM's ``max_model_len``: the longest sequence (prompt + output) served, at most the model's context."""
    _check_positive("max_model_len", value, allow_none=True)
    if value is not None and value > n_positions:
        raise ValueError(f"max_model_len={value} exceeds the model's context of {n_positions} positions")
    return n_positions if value is None else value


def _check_lora_arguments(enable_lora, max_loras, max_lora_rank, max_cpu_loras) -> None:
    if not isinstance(enable_lora, bool):
        raise ValueError(f"enable_lora must be a bool, got {enable_lora!r}")
    _check_positive("max_loras", max_loras)
    _check_positive("max_lora_rank", max_lora_rank)
    _check_positive("max_cpu_loras", max_cpu_loras, allow_none=True)
    if max_cpu_loras is not None and max_cpu_loras < max_loras:
        raise ValueError(f"max_cpu_loras={max_cpu_loras} is below max_loras={max_loras}")


class LLMEngine:
    """A GPT-2 model, its paged KV cache and the scheduler; built from the same arguments as ``LLM``.

    ``enable_prefix_caching`` (default on) reuses the K/V of full blocks a previous request computed for the same
    prefix. ``max_num_batched_tokens`` is the per-step token budget that decode tokens and prompt chunks share
    (default ``max(4096, n_positions, max_num_seqs)``). ``split_special_tokens`` encodes ``<|endoftext|>`` written
    in prompt text as literal characters (default: as token 50256, as transformers does). ``speculative_config``
    (vLLM's: ``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}``)
    turns on speculative decoding by n-gram lookup (:mod:`engine.speculative`); ``{"model": "gpt2",
    "num_speculative_tokens": k}`` drafts with a smaller GPT-2 (:mod:`engine.draft_model`).
    ``scheduling_policy="priority"`` (vLLM's) serves waiting requests by their ``priority`` (lower first) and
    preempts the lowest-priority one.
    ``enable_lora`` serves PEFT LoRA adapters named per request (:mod:`engine.lora`): up to ``max_loras`` of them
    in a step, of rank up to ``max_lora_rank``, ``max_cpu_loras`` kept on the host (default ``max_loras``).
    ``max_model_len`` (vLLM's) caps prompt + output below the model's context; the KV pool takes ``num_blocks``, or
    what ``kv_cache_memory`` bytes or vLLM's ``gpu_memory_utilization`` (a fraction of the GPU, less what is in use
    and the largest step's peak, :mod:`engine.kv_budget`) hold, at most ``max_num_seqs`` sequences of
    ``max_model_len``.
    """

    def __init__(
        self,
        model: str | os.PathLike = "gpt2-medium",
        backend: str = "auto",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 256,
        load_format: str = "auto",
        quantization: str | None = None,
        tokenizer: str | os.PathLike | None = None,
        kv_cache_memory: int | None = None,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        progress: bool = True,
        seed: int | None = None,
        enforce_eager: bool = False,
        split_special_tokens: bool = False,
        speculative_config: SpeculativeConfig | dict | None = None,
        scheduling_policy: str = "fcfs",
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
    ) -> None:
        _check_arguments(
            block_size, max_num_seqs, num_blocks, max_num_batched_tokens, load_format, quantization,
            split_special_tokens, enable_prefix_caching,
        )  # fmt: skip
        if scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {POLICIES}, got {scheduling_policy!r}")
        self.scheduling_policy = scheduling_policy
        _check_lora_arguments(enable_lora, max_loras, max_lora_rank, max_cpu_loras)
        self.speculative = SpeculativeConfig.parse(speculative_config)
        self.split_special_tokens = split_special_tokens
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.ops = make_ops(backend, self.device)
        self.backend = self.ops.name
        if seed is not None:
            torch.manual_seed(seed)
        self.progress = progress

        self.model_path, self.config, weights = self._load(model, load_format)
        self.max_model_len = _max_model_len(max_model_len, self.config.n_positions)
        self.quantization = quantization
        self.model = GPT2(self.config, weights, self.ops, quantization)
        draft = self._load_draft(load_format) if self.speculative and self.speculative.model is not None else None
        self.loras = None
        if enable_lora:
            self.loras = LoRASlots(self.config, max_loras, max_lora_rank, self.dtype, self.device, max_cpu_loras)
            self.model.lora = self.loras.stacks
        self._tokenizer_source = tokenizer if tokenizer is not None else self.model_path
        self._tokenizer = None
        self._tokenizer_error: str | None = None
        self._grammar_compiler = None  # structured outputs' GrammarCompiler, made on first use
        self._grammar_lock = threading.Lock()

        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens or max(
            MIN_BATCHED_TOKENS, self.max_model_len, max_num_seqs
        )
        self.step_reserve_bytes = 0  # what gpu_memory_utilization leaves beside the pool for the largest step
        budget = kv_budget(self.device, kv_cache_memory, gpu_memory_utilization, self._step_peak_bytes)
        num_blocks = num_blocks or self._num_blocks_from_budget(budget, max_num_seqs, draft)
        self.kv = KVCache.allocate(self.config, num_blocks, block_size, self.dtype, self.device)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        logger.info("%s", self.kv_cache_summary())
        self._graphs = self.device.type == "cuda" and self.ops.cuda_graphs and not enforce_eager
        static = None
        if self._graphs:  # decode as CUDA graphs
            rows = max_num_seqs * (1 + (self.speculative.num_speculative_tokens if self.speculative else 0))
            rows = min(rows, self.max_num_batched_tokens)  # a sequence's drafts are decode rows too
            static = StaticDecoder(self.model, self.kv, rows, self.device, capture=True, max_context=self.max_model_len)
        self.runner = ModelRunner(self.model, self.kv, self.blocks, self.device, static, self.loras)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, self.max_num_batched_tokens, scheduling_policy,
                                   max_loras if enable_lora else None)  # fmt: skip
        self.sampler = Sampler(self.config.eos_token_id)
        self.proposer = self._proposer(draft, max_num_seqs)
        self._last_sampling: tuple[list[Sequence], int, SamplingBatch] | None = None  # the last step's, see _sample
        self.output_processor = OutputProcessor(self.config.eos_token_id)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._seq_ids = itertools.count()  # unique even across requests made but never added
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.spec_drafts = self.spec_draft_tokens = self.spec_accepted_tokens = 0
        self.spec_accepted_per_pos = [0] * (self.speculative.num_speculative_tokens if self.speculative else 0)

    # ---------------------------------------------------------------- loading
    def _load(self, model, load_format):
        from engine.loader import load_checkpoint, resolve_model
        from engine.weights import random_weights

        if load_format == "dummy":
            path = None
            if os.path.isdir(str(model)):
                config = ModelConfig.from_file(os.path.join(str(model), "config.json"))
                path = resolve_model(model)
            else:
                config = ModelConfig.preset(str(model))
            return path, config, random_weights(config, self.dtype, self.device)
        path = resolve_model(model)
        config, weights = load_checkpoint(path, self.dtype, self.device, progress=self.progress)
        return path, config, weights

    def _load_draft(self, load_format: str) -> GPT2:
        """``speculative_config``'s draft model, loaded as the target is (backend, dtype, device, ``load_format``)
        but never quantized; ``ValueError`` unless it reads the target's vocabulary over the target's context."""
        what = f"speculative_config: draft model {str(self.speculative.model)!r}"
        try:
            _, config, weights = self._load(self.speculative.model, load_format)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        if config.vocab_size != self.config.vocab_size:
            raise ValueError(f"{what} has a vocabulary of {config.vocab_size} tokens, the target's has "
                             f"{self.config.vocab_size}: the draft must share the target's tokenizer")  # fmt: skip
        if config.n_positions < self.max_model_len:
            raise ValueError(f"{what} reads {config.n_positions} positions, fewer than the target's "
                             f"{self.max_model_len} (max_model_len)")  # fmt: skip
        return GPT2(config, weights, self.ops)

    def _proposer(self, draft: GPT2 | None, max_num_seqs: int):
        """What drafts tokens for speculative decoding: n-gram lookup, or ``draft`` over a KV cache of its own
        that the target's block tables index (one decode row per sequence; CUDA graphs as the target's)."""
        if self.speculative is None:
            return None
        if draft is None:
            return NgramProposer(self.speculative)
        kv = KVCache.allocate(draft.config, self.blocks.num_blocks, self.block_size, self.dtype, self.device)
        static = None
        if self._graphs:
            static = StaticDecoder(draft, kv, max_num_seqs, self.device, capture=True, max_context=self.max_model_len)
        return DraftModelProposer(ModelRunner(draft, kv, self.blocks, self.device, static), self.config.eos_token_id)

    def _step_peak_bytes(self) -> int:
        # the target's step only: a draft model's steps run before it (their memory free again) and keep fewer logits
        args = self.model, self.max_num_batched_tokens, self.max_num_seqs, self.max_model_len
        self.step_reserve_bytes = step_peak_bytes(*args)
        return self.step_reserve_bytes

    def kv_cache_summary(self) -> str:
        """vLLM's start-up line: the pool's size, how many full-length requests it holds at once, and what
        ``gpu_memory_utilization`` left free beside it for the largest step. Logged at INFO when the engine is
        built (logger ``gpt2_triton.engine``); ``serve`` logs it once its log is set up."""
        tokens = self.blocks.num_blocks * self.block_size
        gib = self.blocks.num_blocks * KVCache.bytes_per_block(self.config, self.block_size, self.dtype) / 2**30
        concurrency = tokens / (cdiv(self.max_model_len, self.block_size) * self.block_size)
        line = (f"KV cache: {self.blocks.num_blocks} blocks of {self.block_size} tokens ({tokens} tokens, {gib:.2f} "
                f"GiB); maximum concurrency for {self.max_model_len} tokens per request: "
                f"{concurrency:.2f}x")  # fmt: skip
        if self.step_reserve_bytes:
            line += (f"; {self.step_reserve_bytes / 2**30:.2f} GiB left free for the largest step "
                     f"({self.max_num_batched_tokens} tokens)")  # fmt: skip
        return line

    def _num_blocks_from_budget(self, budget: int, max_num_seqs: int, draft: GPT2 | None) -> int:
        per_block = KVCache.bytes_per_block(self.config, self.block_size, self.dtype)
        if draft is not None:  # the draft's cache has the same blocks
            per_block += KVCache.bytes_per_block(draft.config, self.block_size, self.dtype)
        wanted = max_num_seqs * cdiv(self.max_model_len, self.block_size)  # every slot full-length
        num_blocks = min(wanted, budget // per_block)
        if num_blocks < 1:
            raise ValueError(f"a KV budget of {budget} bytes (kv_cache_memory / gpu_memory_utilization) holds no "
                             f"block of {per_block} bytes")  # fmt: skip
        return num_blocks

    def get_tokenizer(self):
        """The GPT-2 BPE tokenizer (tiktoken), from the checkpoint's vocab.json + merges.txt."""
        if self._tokenizer is None:
            from engine.tokenizer import load_tokenizer

            if self._tokenizer_error is not None:  # don't retry (a network attempt) on every call
                raise ValueError(self._tokenizer_error)
            try:
                self._tokenizer = load_tokenizer(self._tokenizer_source)
                self._tokenizer.split_special_tokens = self.split_special_tokens
            except ValueError as e:
                self._tokenizer_error = str(e)
                raise
        return self._tokenizer

    def has_tokenizer(self) -> bool:
        try:
            self.get_tokenizer()
            return True
        except ValueError:
            return False

    # ---------------------------------------------------------------- requests in
    def token_ids(self, prompt: Prompt, what: str = "prompt") -> list[int]:
        """``prompt`` as token ids, checked against the vocabulary; ``ValueError`` naming ``what`` if unusable."""
        prompt, salt = unwrapped(prompt, what)
        if salt is not None:  # make_request applies it; a caller that only wants the ids would lose it
            raise ValueError(f"{what}: cache_salt applies to generation requests (generate, the server)")
        if isinstance(prompt, str):
            ids = self.get_tokenizer().encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"{what}: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        else:
            raise ValueError(f"{what} must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"{what} is empty")
        return ids

    def make_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        what: str | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> Request:
        """Validate a request without adding it (``ValueError`` naming what is wrong); ``add`` it afterwards.
        ``priority`` (lower first) needs ``scheduling_policy="priority"``; ``lora_request`` needs ``enable_lora``."""
        what = what or f"request {request_id!r}"
        prompt, salt = unwrapped(prompt, what)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"{what}: priority must be an integer, got {priority!r}")
        if priority and self.scheduling_policy != "priority":
            raise ValueError(f"{what}: priority={priority} needs scheduling_policy='priority'")
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"{what}: params must be a SamplingParams, got {type(params).__name__}")
        ids = self.truncated(self.token_ids(prompt, what), params.truncate_prompt_tokens, what)
        self.check_fits(len(ids), params, what)
        self._check_token_ids(params, what)
        detokenize = params.detokenize and (isinstance(prompt, str) or self.has_tokenizer())
        if params.stop and not detokenize:
            raise ValueError(f"{what}: stop strings need a tokenizer (pass tokenizer=...) or use stop_token_ids")
        request = Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, detokenize)
        request.priority = priority
        if lora_request is not None:
            self.check_lora(lora_request, what)
            request.lora_request = lora_request
            request.cache_root = hash(("lora", lora_request.lora_int_id))
        if salt is not None:  # vLLM's cache_salt: only requests of the same salt share cached blocks
            request.cache_root = hash((request.cache_root, "salt", salt))
        if params.bad_words:
            request.bad_word_ids = self._bad_word_ids(params.bad_words, what)
        if params.prompt_logprobs is not None:
            if params.prompt_logprobs_start > len(ids):
                raise ValueError(
                    f"{what}: prompt_logprobs_start={params.prompt_logprobs_start} is past the prompt's "
                    f"{len(ids)} tokens"
                )
            request.prompt_logprobs = [None] * params.prompt_logprobs_start  # filled from there as rows compute
        for j in range(params.n):
            gen = seeded_generator(params.seed, j, self.device) if params.seed is not None else None
            status = SequenceStatus.WAITING if j == 0 else SequenceStatus.FORK_PENDING
            request.seqs.append(Sequence(next(self._seq_ids), request, j, generator=gen, status=status))
        if params.structured_outputs is not None:
            try:
                for seq in request.seqs:  # each sample walks the grammar on its own
                    seq.grammar = self.grammar(params.structured_outputs)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
        return request

    def grammar(self, structured_outputs):
        """A fresh walk over the grammar of ``structured_outputs`` (its index compiled on first use, then kept);
        ``ValueError`` naming the field that cannot be compiled, or saying what is missing."""
        with self._grammar_lock:  # the server compiles in worker threads: one compiler, made once
            if self._grammar_compiler is None:
                from engine.structured_outputs import GrammarCompiler

                if not self.has_tokenizer():
                    raise ValueError("structured_outputs need a tokenizer (pass tokenizer=...)")
                self._grammar_compiler = GrammarCompiler(self.get_tokenizer())
        return self._grammar_compiler.grammar(structured_outputs)

    def check_lora(self, lora_request: LoRARequest, what: str) -> None:
        """The adapter can run here: LoRA is on, and it loads (read from disk on first use)."""
        if self.loras is None:
            raise ValueError(f"{what}: lora_request needs an engine made with enable_lora=True")
        try:
            self.loras.check(lora_request)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None

    def _bad_word_ids(self, words: list[str], what: str) -> list[list[int]]:
        """``bad_words`` as token sequences, each word as written and after a space (vLLM's two forms)."""
        if not self.has_tokenizer():
            raise ValueError(f"{what}: bad_words need a tokenizer (pass tokenizer=...)")
        encode = self.get_tokenizer().encode
        return [list(ids) for word in words for ids in {tuple(encode(word)), tuple(encode(" " + word.lstrip(" ")))}]

    def truncated(self, ids: list[int], keep: int | None, what: str) -> list[int]:
        """The last ``keep`` prompt tokens (``truncate_prompt_tokens``; -1: the context's worth), as vLLM cuts."""
        if keep is None:
            return ids
        context = self.max_model_len
        if keep > context:
            raise ValueError(f"{what}: truncate_prompt_tokens={keep} exceeds the model's context of {context} "
                             "tokens (max_model_len)")  # fmt: skip
        return ids[-(context if keep == -1 else keep) :]

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams, what: str) -> None:
        """Refuse a request that could never run: past the context, the whole KV pool, or ``max_num_seqs``.

        The pool check counts ``n`` full copies (no sharing), so that any one request alone always fits, whatever
        the scheduler has to preempt to run it."""
        total = num_prompt_tokens + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"{what}: {num_prompt_tokens} prompt tokens + max_tokens={params.max_tokens} = {total} exceeds the "
                f"model's context of {self.max_model_len} tokens (max_model_len)"
            )
        needed = self.blocks.blocks_needed(total - 1) * params.n
        if needed > self.blocks.num_blocks:
            raise ValueError(
                f"{what}: needs {needed} KV blocks (n={params.n}) but the cache has {self.blocks.num_blocks}; "
                "raise num_blocks / kv_cache_memory or lower max_tokens"
            )
        if params.n > self.max_num_seqs:
            raise ValueError(f"{what}: n={params.n} exceeds max_num_seqs={self.max_num_seqs}")

    def _check_token_ids(self, params: SamplingParams, what: str) -> None:
        """``logit_bias`` and ``allowed_token_ids`` ids must be in the vocabulary (``SamplingParams`` checked the
        rest, not knowing it)."""
        for name in ("logit_bias", "allowed_token_ids"):
            bad = [t for t in getattr(params, name) or () if t >= self.config.vocab_size]
            if bad:
                raise ValueError(
                    f"{what}: {name} token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})"
                )

    def add(self, request: Request, fork_of: Sequence | None = None) -> None:
        """Queue a request built by :meth:`make_request`. ``fork_of``: a finished sequence of a ``keep_blocks``
        request whose tokens the prompt extends; the request starts from its blocks, computing only the rest."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use by an unfinished request")
        if fork_of is not None and fork_of.block_table:
            assert request.params.n == 1 and fork_of.num_computed < len(request.prompt_token_ids)
            self.blocks.fork(fork_of, request.seqs[0])
        self.requests[request.request_id] = request
        self.output_processor.add_request(request, self._tokenizer)
        self.prompt_tokens += len(request.prompt_token_ids)
        self.scheduler.add(request.seqs[0])

    def release(self, seqs: Iterable[Sequence]) -> None:
        """Free the blocks that finished sequences of ``keep_blocks`` requests kept (a sequence without blocks is
        passed over)."""
        for seq in seqs:
            if seq.is_finished:
                self.blocks.free(seq)

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a prompt (text or token ids); its outputs come from :meth:`step` under ``request_id``."""
        request = self.make_request(request_id, prompt, params, priority=priority, lora_request=lora_request)
        if arrival_time is not None:
            request.metrics = replace(request.metrics, arrival_time=arrival_time)
        self.add(request)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests and free their blocks; ids that are unknown or already finished are ignored."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            for seq in request.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish("abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached block so later prompts are computed afresh (a cold-cache measurement); False,
        and nothing forgotten, while requests are unfinished."""
        return not self.requests and self.blocks.reset_prefix_cache()

    # ---------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for every request that got a new token this step, as its
        ``SamplingParams.output_kind`` asks (default: everything so far; final-only requests only when done)."""
        if not self.scheduler.has_work:
            return []
        scheduled = self.scheduler.schedule()
        if not scheduled.seqs:
            # every request was checked against the whole pool on entry, so an empty pool always admits one
            raise RuntimeError("scheduler stalled: sequences wait but none can be scheduled")
        try:
            if self.proposer is not None:
                self.proposer.before_step(scheduled)
            seqs, logits = self.runner.execute(scheduled)
            self.scheduler.step_done(scheduled)
            seqs, logits = self._fork(seqs, logits)
            if seqs:
                self._sample(seqs, logits)
            return self._outputs(seqs)
        except BaseException:
            # The step's requests are in an unknown state (computed but not sampled, say, which would make every
            # later step fail on them): end them, keep serving the rest.
            self.abort_request({seq.request.request_id for seq in scheduled.seqs})
            raise

    def _fork(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Sequences whose request's prompt just got computed start its other samples from the same logits."""
        if not any(seq.request.params.n > 1 and seq.request.num_pending_forks for seq in seqs):
            return seqs, logits
        expanded, rows = [], []
        for i, seq in enumerate(seqs):
            family = [seq]
            if seq.request.num_pending_forks:
                family += [s for s in seq.request.seqs if s.status is SequenceStatus.FORK_PENDING]
                self.scheduler.fork(seq, family[1:])
            expanded += family
            rows += [i] * len(family)
        return expanded, logits[list_tensor(rows, torch.int64, logits.device)]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        batch = self._sampling_batch(seqs, logits.shape[-1])
        tokens, logprobs = self.sampler.sample(logits, batch, seqs)  # seqs: the histories penalties read
        if self.speculative is not None:
            tokens = self.proposer.verify(seqs, logits, tokens)
        chosen, tops = token_logprobs(logprobs, tokens, batch.num_top)
        if self.speculative is not None:
            return self._take_speculated(seqs, tokens.tolist(), chosen, tops)
        for seq, token, logprob, top in zip(seqs, tokens.tolist(), chosen, tops):
            self.output_processor.append_token(seq, token, logprob, top)
            if seq.is_finished:
                self.scheduler.finish(seq, seq.request.keep_blocks)
        self.generation_tokens += len(seqs)

    def _take_speculated(self, seqs: list[Sequence], tokens: list[int], chosen: list[float], tops: list) -> None:
        """:meth:`_sample`'s bookkeeping when speculating: a sequence with drafts has a row for its last token and
        one per draft (in ``seqs`` once per row) and takes the tokens :func:`accepted_length` counts; then every
        sequence still decoding gets its next drafts."""
        i = 0
        while i < len(seqs):
            seq = seqs[i]
            drafts = seq.draft_token_ids
            rows = len(drafts) + 1
            taken = accepted_length(drafts, tokens[i : i + rows])
            for j in range(i, i + taken):
                self.output_processor.append_token(seq, tokens[j], chosen[j], tops[j])
                if seq.is_finished:
                    taken = j - i + 1
                    break
            seq.num_computed -= rows - taken  # the K/V of rejected drafts are not the sequence's
            seq.draft_computed = min(seq.draft_computed, seq.num_computed)  # nor the draft model's
            self.blocks.register_full_blocks(seq, seq.num_computed)  # accepted drafts may have filled blocks
            self.generation_tokens += taken
            if drafts:
                self.spec_drafts += 1
                self.spec_draft_tokens += len(drafts)
                self.spec_accepted_tokens += taken - 1
                for j in range(taken - 1):  # draft j is accepted only with every one before it
                    self.spec_accepted_per_pos[j] += 1
            i += rows
            seq.draft_token_ids = [] if seq.is_finished else self._drafts(seq)
            if seq.is_finished:
                self.scheduler.finish(seq, seq.request.keep_blocks)

    def _drafts(self, seq: Sequence) -> list[int]:
        """The tokens a decoding sequence speculates next: at most what its ``max_tokens`` leaves after the token
        its next step samples anyway; none for a request that must not speculate, or while the batch is too large
        to gain (``disable_by_batch_size``)."""
        p, generated = seq.params, len(seq.output_token_ids)
        room = min(self.speculative.num_speculative_tokens, p.max_tokens - generated - 1)
        if room < 1 or not speculates(p, generated, seq.generator is not None):
            return []
        busy = self.speculative.disable_by_batch_size
        if busy is not None and len(self.scheduler.running) >= busy:  # a full batch is bound by compute, not weights
            return []
        return self.proposer.propose(seq, room)

    def _sampling_batch(self, seqs: list[Sequence], vocab: int) -> SamplingBatch:
        """The sampling parameters of ``seqs``, read again only when the batch is not the previous step's (the
        same sequences in the same order: most decode steps)."""
        previous = self._last_sampling
        if previous is not None and previous[1] == vocab and len(previous[0]) == len(seqs):
            if all(map(operator.is_, previous[0], seqs)):
                return previous[2]
        params, generators = [seq.params for seq in seqs], [seq.generator for seq in seqs]
        batch = SamplingBatch.of(params, generators, vocab, self.device)
        self._last_sampling = (seqs, vocab, batch)  # the sequences kept alive: no new one can take an old one's id
        return batch

    def _outputs(self, seqs: list[Sequence]) -> list[RequestOutput]:
        now = time.time()
        outputs = []
        make_output = self.output_processor.make_output
        final_only = RequestOutputKind.FINAL_ONLY
        for request in dict.fromkeys([seq.request for seq in seqs]):  # each once, in batch order
            if request.metrics.first_token_time is None:
                request.metrics = replace(request.metrics, first_token_time=now)
            finished = request.finished
            if finished:
                request.metrics = replace(request.metrics, finished_time=now)
                del self.requests[request.request_id]
            elif request.params.output_kind is final_only:  # a final-only request's one output is its last
                continue
            outputs.append(make_output(request, finished))
        return outputs

    def get_stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_cache_usage=self.blocks.usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            spec_decode_num_drafts=self.spec_drafts,
            spec_decode_num_draft_tokens=self.spec_draft_tokens,
            spec_decode_num_accepted_tokens=self.spec_accepted_tokens,
            spec_decode_num_accepted_tokens_per_pos=tuple(self.spec_accepted_per_pos),
            **self._lora_stats(),
        )

    def _lora_stats(self) -> dict:
        if self.loras is None:
            return {}

        def names(seqs) -> tuple[str, ...]:
            return tuple(sorted({seq.request.lora_request.lora_name for seq in seqs if seq.request.lora_request}))

        s = self.scheduler
        return dict(running_lora_adapters=names(s.running), waiting_lora_adapters=names(s.waiting),
                    max_lora=self.loras.max_loras)  # fmt: skip
