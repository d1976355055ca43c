"""``LLM``: the public front (vLLM's offline API): load once, then generate, stream, score and embed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import torch

from engine.config import ModelConfig
from engine.cuda_graphs import StaticDecoder
from engine.kv_cache import BlockManager, KVCache, cdiv
from engine.model import GPT2
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, RequestOutput, ScoreOutput, StreamDelta
from engine.progress import progress_bar
from engine.sampling import Sampler, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

BACKENDS = ("auto", "torch", "triton")
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = (None, "int8", "int4")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
CPU_KV_CACHE_BYTES = 4 << 30  # default KV pool on CPU (vLLM's CPU backend default)
GPU_KV_CACHE_FRACTION = 0.5  # of the free device memory left after loading weights

Prompt = str | list[int]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of float32, float16, bfloat16 (or None/'auto'), got {dtype!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a valid torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return dev


def make_ops(backend: str, device: torch.device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        from engine.ops import TorchOps

        return TorchOps()
    from engine.triton_ops import TritonOps

    return TritonOps(device)


def quantize_weight(weight: torch.Tensor, mode: str):
    """Weight-only quantization of one linear weight ``[N, K]`` (int4 groups of 128, or 64 where K needs it)."""
    from kernels.quant import quantize_int4, quantize_int8

    if mode == "int8":
        return quantize_int8(weight)
    return quantize_int4(weight, group_size=128 if weight.shape[1] % 128 == 0 else 64)


def _seed_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """Completion ``index`` of a seeded request draws from its own stream, independent of the batch."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + index) % (1 << 63))
    return g


class LLM:
    """A GPT-2 model ready to serve: ``LLM("gpt2-medium").generate("Hello", SamplingParams(max_tokens=20))``.

    ``model`` is a local Hugging Face checkpoint directory or a hub id (resolved through huggingface_hub when
    installed); with ``load_format="dummy"`` it names a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a
    local config and the weights are random. ``backend="auto"`` picks triton on CUDA and torch on CPU.
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
        progress: bool = True,
        seed: int | None = None,
        enforce_eager: bool = False,
    ) -> None:
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ValueError(f"num_blocks must be a positive integer or None, got {num_blocks!r}")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.ops = make_ops(backend, self.device)
        self.backend = self.ops.name
        if seed is not None:
            torch.manual_seed(seed)
        self.progress = progress

        self.model_path, self.config, weights = self._load(model, load_format)
        if quantization is not None:
            weights.map_linear(lambda w: quantize_weight(w, quantization))
        self.quantization = quantization
        self.model = GPT2(self.config, weights, self.ops)
        self._tokenizer_source = tokenizer if tokenizer is not None else self.model_path
        self._tokenizer = None
        self._tokenizer_error: str | None = None

        self.block_size = block_size
        num_blocks = num_blocks or self._num_blocks_from_budget(kv_cache_memory, max_num_seqs)
        self.kv = KVCache.allocate(self.config, num_blocks, block_size, self.dtype, self.device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.max_num_batched_tokens = max_num_batched_tokens or max(self.config.n_positions, 4096)
        static = None
        if self.device.type == "cuda" and self.ops.cuda_graphs and not enforce_eager:  # decode as CUDA graphs
            static = StaticDecoder(self.model, self.kv, max_num_seqs, self.device, capture=True)
        self.runner = ModelRunner(self.model, self.kv, self.blocks, self.device, static)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, self.max_num_batched_tokens)
        self.sampler = Sampler()

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

    def _num_blocks_from_budget(self, budget: int | None, max_num_seqs: int) -> int:
        per_block = KVCache.bytes_per_block(self.config, self.block_size, self.dtype)
        wanted = max_num_seqs * cdiv(self.config.n_positions, self.block_size)  # every slot full-length
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * GPU_KV_CACHE_FRACTION)
            else:
                budget = CPU_KV_CACHE_BYTES
        num_blocks = min(wanted, budget // per_block)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes holds no block of {per_block} bytes")
        return num_blocks

    # ---------------------------------------------------------------- tokenizer
    def get_tokenizer(self):
        """The GPT-2 BPE tokenizer (tiktoken), from the checkpoint's vocab.json + merges.txt."""
        if self._tokenizer is None:
            from engine.tokenizer import load_tokenizer

            if self._tokenizer_error is not None:  # don't retry (a network attempt) on every call
                raise ValueError(self._tokenizer_error)
            try:
                self._tokenizer = load_tokenizer(self._tokenizer_source)
            except ValueError as e:
                self._tokenizer_error = str(e)
                raise
        return self._tokenizer

    def _token_ids(self, prompt: Prompt, what: str) -> list[int]:
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

    def _prompt_list(self, prompts) -> list[Prompt]:
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            return [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
        return list(prompts)

    # ---------------------------------------------------------------- generation
    def _make_sequences(self, prompts, params) -> tuple[list[RequestOutput], list[Sequence]]:
        prompts = self._prompt_list(prompts)
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif not isinstance(params, (list, tuple)) or len(params) != len(prompts):
            raise ValueError("params must be one SamplingParams or a list with one per prompt")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError("params must be SamplingParams instances")
        requests, seqs = [], []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids = self._token_ids(prompt, f"prompt {i}")
            total = len(ids) + p.max_tokens
            if total > self.config.n_positions:
                raise ValueError(
                    f"prompt {i}: {len(ids)} prompt tokens + max_tokens={p.max_tokens} = {total} exceeds the "
                    f"model's context of {self.config.n_positions} tokens"
                )
            needed = self.blocks.blocks_needed(total - 1) * p.n
            if needed > self.blocks.num_blocks:
                raise ValueError(
                    f"prompt {i}: needs {needed} KV blocks (n={p.n}) but the cache has {self.blocks.num_blocks}; "
                    "raise num_blocks / kv_cache_memory or lower max_tokens"
                )
            requests.append(RequestOutput(prompt if isinstance(prompt, str) else None, ids))
            for j in range(p.n):
                gen = _seed_generator(p.seed, j, self.device) if p.seed is not None else None
                seqs.append(Sequence(len(seqs), i, j, ids, p, generator=gen))
        return requests, seqs

    def _step(self) -> list[Sequence]:
        """Run one scheduled step; returns the sequences that got a new token."""
        seqs, is_prefill = self.scheduler.schedule()
        logits = self.runner.prefill(seqs) if is_prefill else self.runner.decode(seqs)
        seen = None
        if any(s.params.repetition_penalty != 1.0 for s in seqs):
            seen = [torch.tensor(s.all_token_ids(), device=self.device).unique() for s in seqs]
        tokens, logprobs = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs], seen)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            seq.output_token_ids.append(token)
            seq.output_logprobs.append(chosen[i])
            if seq.params.logprobs is not None:
                top = logprobs[i].topk(seq.params.logprobs) if seq.params.logprobs > 0 else None
                entry = {token: chosen[i]}
                if top is not None:
                    entry.update(zip(top.indices.tolist(), top.values.tolist()))
                seq.top_logprobs.append(entry)
            self._check_stop(seq, token)
            if seq.is_finished:
                self.scheduler.finish(seq)
        return seqs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        """Update the text and finish the sequence on EOS, a stop token, a stop string or its length limit.

        EOS and stop tokens end the sequence before their text is added, so ``text`` never contains them.
        """
        p = seq.params
        if token == self.config.eos_token_id and not p.ignore_eos:
            seq.finish("stop")
        elif p.stop_token_ids and token in p.stop_token_ids:
            seq.finish("stop", token)
        elif seq.detokenizer is not None:
            before = len(seq.text)
            seq.text += seq.detokenizer.push(token)
            for s in p.stop or ():
                cut = seq.text.find(s, max(0, before - len(s) + 1))
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    return seq.finish("stop", s)
        if not seq.is_finished and len(seq.output_token_ids) >= p.max_tokens:
            seq.finish("length")
        if seq.is_finished and seq.detokenizer is not None:
            seq.text += seq.detokenizer.flush()  # bytes of an unfinished character, as replacement chars

    def _run(self, seqs: list[Sequence], want_text: bool) -> Iterator[list[Sequence]]:
        if self.scheduler.has_work:
            raise RuntimeError("LLM is already generating (one generate/stream at a time)")
        if want_text:
            from engine.tokenizer import IncrementalDecoder

            for seq in seqs:
                seq.detokenizer = IncrementalDecoder(self.get_tokenizer())
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            while self.scheduler.has_work:
                yield self._step()
        finally:  # an abandoned stream or an exception must not leave blocks allocated
            for seq in list(self.scheduler.running):
                self.scheduler.finish(seq)
            self.scheduler.waiting.clear()

    def _text_wanted(self, prompts) -> bool:
        try:
            self.get_tokenizer()
            return True
        except ValueError:
            if any(isinstance(p, str) for p in self._prompt_list(prompts)):
                raise
            return False  # token-id prompts without a tokenizer: ids only

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt; returns one :class:`RequestOutput` per prompt, in order."""
        want_text = self._text_wanted(prompts)
        requests, seqs = self._make_sequences(prompts, params)
        with progress_bar(
            total=len(seqs), desc="generate", unit="seq", disable=not (use_tqdm and self.progress)
        ) as bar:
            for stepped in self._run(seqs, want_text):
                bar.update(sum(s.is_finished for s in stepped))
        for seq in seqs:
            requests[seq.request_index].outputs.append(self._completion(seq))
        return requests

    def _completion(self, seq: Sequence) -> CompletionOutput:
        return CompletionOutput(
            index=seq.sample_index,
            text=seq.text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.top_logprobs) if seq.params.logprobs is not None else None,
            stop_reason=seq.stop_reason,
        )

    def generate_stream(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> Iterator[StreamDelta]:
        """Yield text deltas as tokens are produced; a stop string is never partly emitted."""
        self.get_tokenizer()
        _, seqs = self._make_sequences(prompts, params)
        for stepped in self._run(seqs, want_text=True):
            for seq in stepped:
                if seq.is_finished:
                    final = self._completion(seq).text
                    delta, seq.emitted = final[seq.emitted :], len(final)
                    yield StreamDelta(seq.request_index, seq.sample_index, delta, [seq.last_token], seq.finish_reason)
                    continue
                hold = max((len(s) - 1 for s in seq.params.stop or ()), default=0)
                upto = max(seq.emitted, len(seq.text) - hold)
                delta, seq.emitted = seq.text[seq.emitted : upto], upto
                yield StreamDelta(seq.request_index, seq.sample_index, delta, [seq.last_token])

    # ---------------------------------------------------------------- scoring and features
    def _batches(self, items: list[list[int]]) -> Iterator[list[int]]:
        """Indices of ``items`` grouped so each group packs at most ``max_num_batched_tokens`` tokens."""
        group, tokens = [], 0
        for i, item in enumerate(items):
            if group and tokens + len(item) > self.max_num_batched_tokens:
                yield group
                group, tokens = [], 0
            group.append(i)
            tokens += len(item)
        if group:
            yield group

    def score(self, texts: Prompt | Seq[Prompt], stride: int | None = None) -> list[ScoreOutput]:
        """Log-likelihood and perplexity of each text; texts longer than the context use a sliding window.

        Each window spans up to ``n_positions`` tokens and advances by ``stride`` (default half the context);
        tokens are scored once, in the first window that reaches them, with all of that window before them as
        context (the strided evaluation of Radford et al. 2019 and transformers' perplexity guide).
        """
        n_ctx = self.config.n_positions
        stride = n_ctx // 2 if stride is None else stride
        if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride < n_ctx:
            # stride == n_ctx would start a window at a token with no context before it in its window
            raise ValueError(f"stride must be an integer in [1, {n_ctx - 1}], got {stride!r}")
        items = [self._token_ids(t, f"text {i}") for i, t in enumerate(self._prompt_list(texts))]
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
                hidden = self.runner.hidden_states([spans[w] for w in group])
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

    def features(self, texts: Prompt | Seq[Prompt]) -> list[torch.Tensor]:
        """The last hidden state of each text, ``[T, d_model]`` (transformers' ``last_hidden_state``)."""
        items = [self._token_ids(t, f"text {i}") for i, t in enumerate(self._prompt_list(texts))]
        for i, ids in enumerate(items):
            if len(ids) > self.config.n_positions:
                raise ValueError(f"text {i} has {len(ids)} tokens, more than the context of {self.config.n_positions}")
        out: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
        for group in self._batches(items):
            hidden = self.runner.hidden_states([items[i] for i in group])
            for i, part in zip(group, hidden.split([len(items[i]) for i in group])):
                out[i] = part
        return out
