"""``LLM``: the offline front (vLLM's API) over :class:`engine.llm_engine.LLMEngine`: generate, stream, score, embed."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import torch

from engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from engine.chat import ChatTemplate
from engine.llm_engine import LLMEngine, Prompt
from engine.lora import LoRARequest
from engine.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput, ScoreOutput, StreamDelta
from engine.pooling import check_pooling, embed, greedy_groups, hidden_states
from engine.progress import progress_bar
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.sequence import Sequence


class LLM:
    """A GPT-2 model ready to serve: ``LLM("gpt2-medium").generate("Hello", SamplingParams(max_tokens=20))``.

    ``model`` is a local Hugging Face checkpoint directory or a hub id (resolved through huggingface_hub when
    installed); with ``load_format="dummy"`` it names a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a
    local config and the weights are random. ``backend="auto"`` picks triton on CUDA and torch on CPU. Every
    argument goes to :class:`LLMEngine` (``llm.llm_engine``), which takes requests one at a time; ``LLM`` runs a
    batch of them to the end (one ``generate``/``generate_stream`` at a time).
    """

    def __init__(self, model: str | os.PathLike = "gpt2-medium", **kwargs) -> None:
        self.llm_engine = LLMEngine(model, **kwargs)
        self._call_ids = itertools.count()

    # what the engine owns, for callers and tests that look inside
    config = property(lambda self: self.llm_engine.config)
    model = property(lambda self: self.llm_engine.model)
    model_path = property(lambda self: self.llm_engine.model_path)
    device = property(lambda self: self.llm_engine.device)
    dtype = property(lambda self: self.llm_engine.dtype)
    backend = property(lambda self: self.llm_engine.backend)
    kv = property(lambda self: self.llm_engine.kv)
    blocks = property(lambda self: self.llm_engine.blocks)
    runner = property(lambda self: self.llm_engine.runner)
    progress = property(lambda self: self.llm_engine.progress)
    max_num_batched_tokens = property(lambda self: self.llm_engine.max_num_batched_tokens)
    max_model_len = property(lambda self: self.llm_engine.max_model_len)

    def get_tokenizer(self):
        """The GPT-2 BPE tokenizer (tiktoken), from the checkpoint's vocab.json + merges.txt."""
        return self.llm_engine.get_tokenizer()

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached block, so the next prompts are computed afresh (True once done)."""
        return self.llm_engine.reset_prefix_cache()

    def _token_ids(self, prompt: Prompt, what: str) -> list[int]:
        return self.llm_engine.token_ids(prompt, what)

    def _prompt_list(self, prompts) -> list[Prompt]:
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            return [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a string, a list of token ids, a prompt dict, or a non-empty list of "
                             "those")  # fmt: skip
        return list(prompts)

    # ---------------------------------------------------------------- generation
    def _add_requests(
        self, prompts, params, output_kind: RequestOutputKind, priority=None, lora_request=None
    ) -> list[str]:
        """Validate every prompt first (nothing is queued if one is refused), then queue them, each with the given
        ``output_kind`` (the caller's params are left as they are); returns their ids."""
        engine = self.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("LLM is already generating (one generate/stream at a time)")
        prompts = self._prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif not isinstance(params, (list, tuple)) or len(params) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or a list with one per prompt")
        params = [
            dataclasses.replace(p, output_kind=output_kind) if isinstance(p, SamplingParams) else p  # make_request
            for p in (SamplingParams() if p is None else p for p in params)  # refuses anything else, naming it
        ]
        if priority is None:
            priority = [0] * len(prompts)
        elif not isinstance(priority, (list, tuple)) or len(priority) != len(prompts):
            raise ValueError("priority must be a list with one integer per prompt")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_request = [lora_request] * len(prompts)
        elif not isinstance(lora_request, (list, tuple)) or len(lora_request) != len(prompts):
            raise ValueError("lora_request must be one LoRARequest or a list with one (or None) per prompt")
        call = next(self._call_ids)
        requests = [
            engine.make_request(f"{call}-{i}", prompt, p, what=f"prompt {i}", priority=rank, lora_request=lora)
            for i, (prompt, p, rank, lora) in enumerate(zip(prompts, params, priority, lora_request))
        ]
        for request in requests:
            engine.add(request)
        return [r.request_id for r in requests]

    def _steps(self, request_ids: list[str]) -> Iterator[list[RequestOutput]]:
        """Step the engine until every request is done; an abandoned loop or an error aborts what is left."""
        try:
            while self.llm_engine.has_unfinished_requests():
                yield self.llm_engine.step()
        finally:
            self.llm_engine.abort_request(request_ids)

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Seq[int] | None = None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (a string, token ids, or vLLM's ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``
        dicts); returns one :class:`RequestOutput` per prompt, in order. ``sampling_params``: one for all, or one per
        prompt. ``priority``: one per prompt, lower first (with ``scheduling_policy="priority"``).
        ``lora_request``: the LoRA adapter of every prompt, or one (or None) per prompt (with ``enable_lora=True``)."""
        request_ids = self._add_requests(prompts, sampling_params, RequestOutputKind.FINAL_ONLY, priority, lora_request)
        final: dict[str, RequestOutput] = {}
        with progress_bar(total=len(request_ids), desc="generate", unit="req",
                          disable=not (use_tqdm and self.progress)) as bar:  # fmt: skip
            for outputs in self._steps(request_ids):
                done = [out for out in outputs if out.finished]
                final.update((out.request_id, out) for out in done)
                bar.update(len(done))
        return [final[i] for i in request_ids]

    def chat(
        self,
        messages: list[dict] | Seq[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: each conversation (a list of ``{"role", "content"}`` dicts, or a list of those) as
        ``chat_template`` renders it, then :meth:`generate`. GPT-2 ships no chat template, so one must be given
        (a Jinja string; see :mod:`engine.chat`)."""
        if chat_template is None:
            raise ValueError("GPT-2 has no chat template: pass chat_template=... (a Jinja template over messages)")
        eos = self.get_tokenizer().decode([self.config.eos_token_id])
        template = ChatTemplate(chat_template, eos)
        single = isinstance(messages, list) and all(isinstance(m, dict) for m in messages)
        conversations = [messages] if single else messages
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError("messages must be a conversation (a list of dicts) or a non-empty list of them")
        prompts = [template.render(list(c) if isinstance(c, tuple) else c, add_generation_prompt)
                   for c in conversations]  # fmt: skip
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def generate_stream(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> Iterator[StreamDelta]:
        """Yield text deltas as tokens are produced; a stop string is never partly emitted."""
        self.get_tokenizer()
        request_ids = self._add_requests(prompts, sampling_params, RequestOutputKind.DELTA, lora_request=lora_request)
        index = {request_id: i for i, request_id in enumerate(request_ids)}
        for outputs in self._steps(request_ids):
            for out in outputs:
                for c in out.outputs:
                    if c.token_ids:  # skip the samples that did not move this step
                        yield StreamDelta(index[out.request_id], c.index, c.text, c.token_ids, c.finish_reason)

    def beam_search(
        self,
        prompts: Prompt | Seq[Prompt],
        params: BeamSearchParams,
        use_tqdm: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> list[BeamSearchOutput]:
        """The ``params.beam_width`` best continuations of each prompt by beam search (transformers' algorithm:
        ``generate(num_beams=beam_width, do_sample=False)`` finds the same; see :mod:`engine.beam_search`), under
        the LoRA adapter ``lora_request`` if given."""
        engine = self.llm_engine
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        self._check_lora(lora_request)
        if engine.has_unfinished_requests():
            raise RuntimeError("LLM is already generating (one generate/stream/beam_search at a time)")
        items = [self._token_ids(p, f"prompt {i}") for i, p in enumerate(self._prompt_list(prompts))]
        if params.beam_width > engine.max_num_seqs:
            raise ValueError(f"beam_width={params.beam_width} exceeds max_num_seqs={engine.max_num_seqs}")
        copies = SamplingParams(n=params.beam_width, max_tokens=params.max_tokens)  # as if beams shared nothing
        for i, ids in enumerate(items):
            engine.check_fits(len(ids), copies, f"prompt {i}")
        searches = [BeamSearch(ids, params, self.config.eos_token_id) for ids in items]
        groups = list(self._beam_groups(items, params))
        call = next(self._call_ids)
        with progress_bar(total=len(groups) * params.max_tokens, desc="beam search", unit="step",
                          disable=not (use_tqdm and self.progress)) as bar:  # fmt: skip
            for g, group in enumerate(groups):
                steps = self._search([searches[i] for i in group], f"{call}-{g}", bar, lora_request)
                bar.update(params.max_tokens - steps)  # the steps an early stop left out
        tokenizer = self.get_tokenizer() if engine.has_tokenizer() else None
        return [s.output(tokenizer) for s in searches]

    def _beam_groups(self, items: list[list[int]], params: BeamSearchParams) -> Iterator[list[int]]:
        """Indices of the prompts, in groups whose beams all fit at once: in ``max_num_seqs``, and in the KV pool
        counting each beam as a full copy (so that the blocks kept between steps never starve the scheduler)."""
        engine, width = self.llm_engine, params.beam_width
        need = [width * engine.blocks.blocks_needed(len(ids) + params.max_tokens) for ids in items]
        return greedy_groups(need, engine.blocks.num_blocks, max_size=engine.max_num_seqs // width)

    def _search(self, searches: list[BeamSearch], prefix: str, bar, lora_request: LoRARequest | None) -> int:
        """Run ``searches`` to their end; returns the number of steps taken.

        Each step, every running beam is a one-token request for its top candidates, forked from the sequence that
        computed the beam it extends: that sequence's request kept its blocks (``keep_blocks``), which the new one
        shares, so only the beam's new token is computed. They are freed once forked, or when the search ends.
        """
        engine = self.llm_engine
        kept: dict[int, list[Sequence]] = {}  # per search: the sequences that computed its running beams
        running: list[Sequence] = []  # this step's: each keeps its blocks once finished
        step = 0
        try:
            while step < searches[0].params.max_tokens and not all(s.done for s in searches):
                requests = {}
                for i, search in enumerate(searches):
                    parents = kept.pop(i, [])
                    for b, beam in enumerate([] if search.done else search.running):
                        prompt = search.prompt_token_ids + beam.tokens
                        request = engine.make_request(f"{prefix}-{step}-{i}-{b}", prompt, search.step_params(beam),
                                                      lora_request=lora_request)  # fmt: skip
                        request.keep_blocks = True
                        engine.add(request, fork_of=parents[beam.source] if parents else None)
                        requests[i, b] = request
                    engine.release(parents)  # the new requests hold what they share of these
                running = [r.seqs[0] for r in requests.values()]
                for _ in self._steps([r.request_id for r in requests.values()]):
                    pass
                for i, search in enumerate(searches):
                    if not search.done:
                        kept[i] = [requests[i, b].seqs[0] for b in range(len(search.running))]
                        search.advance([seq.top_logprobs[0] for seq in kept[i]])
                step += 1
                bar.update(1)
        finally:  # a failed step aborts what had not finished; what had, and what is kept, is freed here
            engine.release(itertools.chain(running, *kept.values()))
        return step

    def _check_lora(self, lora_request: LoRARequest | None) -> None:
        """A call's one adapter can run here: refused before any step."""
        if lora_request is not None:
            self.llm_engine.check_lora(lora_request, "lora_request")

    # ---------------------------------------------------------------- scoring and features
    def _batches(self, items: list[list[int]]) -> Iterator[list[int]]:
        """Indices of ``items`` grouped so each group packs at most ``max_num_batched_tokens`` tokens."""
        return greedy_groups([len(item) for item in items], self.max_num_batched_tokens)

    def _whole_texts(self, texts: Prompt | Seq[Prompt], lora_request: LoRARequest | None) -> list[list[int]]:
        """Texts as token ids that fit the context whole (features, embeddings), and their adapter checked."""
        items = [self._token_ids(t, f"text {i}") for i, t in enumerate(self._prompt_list(texts))]
        self._check_lora(lora_request)
        for i, ids in enumerate(items):
            if len(ids) > self.max_model_len:
                raise ValueError(f"text {i} has {len(ids)} tokens, more than the context of {self.max_model_len} "
                                 "(max_model_len)")  # fmt: skip
        return items

    def score(
        self, texts: Prompt | Seq[Prompt], stride: int | None = None, lora_request: LoRARequest | None = None
    ) -> list[ScoreOutput]:
        """Log-likelihood and perplexity of each text; texts longer than the context use a sliding window.

        Each window spans up to ``max_model_len`` tokens (the context) and advances by ``stride`` (default half
        that); tokens are scored once, in the first window that reaches them, with all of that window before them
        as context (the strided evaluation of Radford et al. 2019 and transformers' perplexity guide). Under the
        LoRA adapter ``lora_request`` if given.
        """
        n_ctx = self.max_model_len
        stride = n_ctx // 2 if stride is None else stride
        if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride < n_ctx:
            # stride == n_ctx would start a window at a token with no context before it in its window
            raise ValueError(f"stride must be an integer in [1, {n_ctx - 1}], got {stride!r}")
        items = [self._token_ids(t, f"text {i}") for i, t in enumerate(self._prompt_list(texts))]
        self._check_lora(lora_request)
        for i, ids in enumerate(items):
            if len(ids) < 2:
                raise ValueError(f"text {i} has {len(ids)} token; scoring needs at least 2")
        # windows: (text index, begin, end, first target position)
        windows = []
        for i, ids in enumerate(items):
            begin, scored = 0, 1
            while scored < len(ids):
                end = min(begin + n_ctx, len(ids))
                windows.append((i, begin, end, scored))
                scored, begin = end, begin + stride
        results = [ScoreOutput(ids, []) for ids in items]
        spans = [items[i][b:e] for i, b, e, _ in windows]
        with progress_bar(total=len(windows), desc="score", unit="window", disable=not self.progress) as bar:
            for group in self._batches(spans):
                hidden = self.runner.hidden_states([spans[w] for w in group], lora_request)
                offset = 0
                for w in group:
                    i, begin, end, first = windows[w]
                    rows = hidden[offset + first - 1 - begin : offset + end - 1 - begin]
                    targets = torch.tensor(items[i][first:end], device=self.device)
                    logp = self.model.logits(rows).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
                    results[i].logprobs += logp.tolist()
                    offset += end - begin
                bar.update(len(group))
        return results

    def features(self, texts: Prompt | Seq[Prompt], lora_request: LoRARequest | None = None) -> list[torch.Tensor]:
        """The last hidden state of each text, ``[T, d_model]`` (transformers' ``last_hidden_state``), under the
        LoRA adapter ``lora_request`` if given."""
        items = self._whole_texts(texts, lora_request)
        out: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
        for i, states in hidden_states(self.llm_engine, items, lora_request):
            out[i] = states
        return out

    def embed(
        self,
        texts: Prompt | Seq[Prompt],
        pooling: str = "last",
        normalize: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """An embedding of each text (vLLM's ``LLM.embed``: ``out.outputs.embedding``): its last token's final
        hidden state, L2-normalized, by default; ``pooling="mean"`` averages every token's (see
        :mod:`engine.pooling`)."""
        check_pooling(pooling, normalize)
        items = self._whole_texts(texts, lora_request)
        vectors = embed(self.llm_engine, items, pooling, normalize, lora_request)
        call = next(self._call_ids)
        return [EmbeddingRequestOutput(f"{call}-{i}", ids, EmbeddingOutput(v.tolist()))
                for i, (ids, v) in enumerate(zip(items, vectors))]  # fmt: skip
