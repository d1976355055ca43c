"""lm-evaluation-harness backend: ``lm_eval --model gpt2-triton`` (registered when this module is imported).

    import engine.evaluation, lm_eval
    lm_eval.simple_evaluate(model="gpt2-triton", model_args="pretrained=./gpt2-medium,dtype=float32",
                            tasks=["lambada_openai"])

Its numbers are those of lm-eval's own ``hf`` backend on the same checkpoint (same tokenization, same truncation,
same rolling windows); only the way they are computed differs:

* ``loglikelihood``: a request whose context + continuation fits the context runs through the engine as one prompt
  scored from its continuation on (``SamplingParams.prompt_logprobs_start``), so requests that share a context (the
  choices of a multiple-choice question) take its K/V from the prefix cache, in whole blocks, instead of computing
  it again; only the continuation's rows go through the LM head. Longer requests are scored whole, packed without
  padding, the LM head again on the scored rows only (log-softmax of the target as its logit minus logsumexp).
* ``loglikelihood_rolling``: lm-eval's own window rules (``get_rolling_token_windows`` + ``make_disjoint_window``,
  context length 1, max length = the model's context), each window scored whole (windows share no prefix).
* ``generate_until``: every request in one ``LLM.generate`` (continuous batching), stop strings ``until`` plus
  ``<|endoftext|>``, contexts left-truncated to leave room for ``max_gen_toks``, as the ``hf`` backend does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from engine.llm import LLM
from engine.lora import LoRARequest, adapter_rank
from engine.sampling_params import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256  # the hf backend's default
# generation kwargs a task may set, beyond until / max_gen_toks / do_sample / temperature (lm-eval's names)
SAMPLING_KWARGS = ("top_p", "top_k", "repetition_penalty")
SCORE_CHUNK = 128  # rows per LM-head call when scoring whole windows: 128 x 50257 fp32 logits = 26 MB

TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]  # (request strings, context ids, continuation ids)


def _as_int(name: str, value) -> int | None:
    """An lm-eval model argument that must be a positive int (``"auto"`` and None mean the default)."""
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto:")):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer or 'auto', got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer or 'auto', got {value!r}")
    return number


@register_model("gpt2-triton")
class GPT2TritonLM(TemplateLM):
    """lm-eval's ``LM`` over :class:`engine.LLM`; arguments are ``LLM``'s (``pretrained`` is its ``model``).

    ``batch_size`` (lm-eval's flag) caps the sequences per engine step (``max_num_seqs``); the per-step token
    budget is ``max_num_batched_tokens``. ``max_length`` (default: the model's context) and ``max_gen_toks``
    (default 256) mean what they mean for the ``hf`` backend; ``seed`` seeds sampled generations per request.
    ``lora_local_path`` (vLLM's lm-eval argument) evaluates the model under that PEFT LoRA adapter.
    """

    def __init__(
        self,
        pretrained: str = "gpt2-medium",
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it; the engine batches by tokens, not by this
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int | None = None,
        llm: LLM | None = None,
        lora_local_path: str | None = None,
        **llm_kwargs,
    ) -> None:
        super().__init__()
        self.lora_request = None
        if lora_local_path:
            llm_kwargs.update(enable_lora=True, max_lora_rank=adapter_rank(lora_local_path))
            self.lora_request = LoRARequest("lm-eval", 1, str(lora_local_path))
        max_num_seqs = _as_int("batch_size", batch_size)
        if max_num_seqs is not None:
            llm_kwargs.setdefault("max_num_seqs", max_num_seqs)
        llm_kwargs.setdefault("progress", False)
        if llm_kwargs.get("device") is None:
            llm_kwargs.pop("device", None)
        self.llm = llm if llm is not None else LLM(pretrained, **llm_kwargs)
        self.pretrained = str(pretrained)
        self.engine_tokenizer = self.llm.get_tokenizer()
        n_ctx = self.llm.max_model_len
        self._max_length = _as_int("max_length", max_length) or n_ctx
        if self._max_length > n_ctx:
            raise ValueError(f"max_length={self._max_length} exceeds the model's context of {n_ctx} (max_model_len)")
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.seed = None if seed is None else int(seed)
        if self.lora_request is not None:
            self.llm.llm_engine.check_lora(self.lora_request, "lora_local_path")

    # ---------------------------------------------------------------- what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.engine_tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self.llm.device

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def get_model_info(self) -> dict:
        """What lm-eval records under ``config`` in its results."""
        return {
            "model_dtype": str(self.llm.dtype),
            "backend": self.llm.backend,
            "quantization": self.llm.llm_engine.quantization,
            "n_positions": self.llm.config.n_positions,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """GPT-2 has no BOS to add: ``add_special_tokens`` changes nothing, as with transformers' tokenizer."""
        ids = self.engine_tokenizer.encode(string)
        left_truncate_len = kwargs.get("left_truncate_len")
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.engine_tokenizer.decode(tokens)

    # ---------------------------------------------------------------- loglikelihood
    def _fits_engine(self, context: list[int], continuation: list[int]) -> bool:
        """Whether the pair is scored unchanged as one engine prompt (which leaves room for the token it samples)."""
        return len(context) + len(continuation) <= min(self.max_length, self.llm.max_model_len - 1)

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:  # fmt: skip
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        through_engine = [i for i, (_, ctx, cont) in enumerate(requests) if self._fits_engine(ctx, cont)]
        whole = [i for i, (_, ctx, cont) in enumerate(requests) if not self._fits_engine(ctx, cont)]
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.llm.progress) as bar:
            for i, answer in self._score_with_prefix_cache([requests[i] for i in through_engine], through_engine):
                results[i] = answer
                bar.update(1)
            for i, answer in self._score_whole([requests[i] for i in whole], whole):
                results[i] = answer
                bar.update(1)
        for (strings, _, _), answer in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def _score_with_prefix_cache(self, requests: list[TokenRequest], ids: list[int]) -> Iterator[tuple[int, tuple]]:
        """Each context + continuation as one prompt, scored from the continuation on; sorted by tokens so that
        requests sharing a context run one after the other and hit its cached blocks."""
        if not requests:
            return
        order = sorted(range(len(requests)), key=lambda j: requests[j][1] + requests[j][2])
        prompts = [requests[j][1] + requests[j][2] for j in order]
        params = [
            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, prompt_logprobs_start=len(requests[j][1]))
            for j in order
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        for j, out in zip(order, outputs):
            continuation = requests[j][2]
            entries = out.prompt_logprobs[len(requests[j][1]) :]
            logprob = sum(entry[token] for entry, token in zip(entries, continuation))
            # the entry holds the token and the row's most likely one: greedy when the token is (ties count)
            greedy = all(max(entry, key=entry.get) == token for entry, token in zip(entries, continuation))
            yield ids[j], (float(logprob), bool(greedy))

    def _score_whole(self, requests: list[TokenRequest], ids: list[int]) -> Iterator[tuple[int, tuple]]:
        """The hf backend's window (context + continuation, left-truncated to ``max_length + 1``, its last token
        dropped) computed whole, packed without padding; the LM head on the continuation's rows only."""
        windows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in requests]
        for group in self.llm._batches(windows):
            hidden = self.llm.runner.hidden_states([windows[j] for j in group], self.lora_request)
            ends = itertools.accumulate(len(windows[j]) for j in group)
            rows = torch.cat([hidden[end - len(requests[j][2]) : end] for j, end in zip(group, ends)])
            targets = torch.tensor([t for j in group for t in requests[j][2]], device=hidden.device)
            logprobs, greedy = self._score_rows(rows, targets)
            counts = [len(requests[j][2]) for j in group]
            for j, logprob, hits in zip(group, logprobs.split(counts), greedy.split(counts)):
                yield ids[j], (float(logprob.sum()), bool(hits.all()))

    def _score_rows(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's log-probability of its target and whether the target is its argmax: the LM head
        ``SCORE_CHUNK`` rows at a time (a chunk's fp32 logits stay in cache), log-softmax as target logit minus
        logsumexp, computed in place."""
        logprobs, greedy = [], []
        with torch.inference_mode():
            for rows, chunk_targets in zip(hidden.split(SCORE_CHUNK), targets.split(SCORE_CHUNK)):
                logits = self.llm.model.logits(rows)  # fp32 [n, V]
                greedy.append(logits.argmax(-1) == chunk_targets)
                picked = logits.gather(1, chunk_targets[:, None]).squeeze(1)
                top = logits.amax(-1, keepdim=True)
                lse = logits.sub_(top).exp_().sum(-1).log_() + top.squeeze(1)
                logprobs.append(picked - lse)
        return torch.cat(logprobs).double(), torch.cat(greedy)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in lm-eval's disjoint rolling windows over the model's context."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for ctx, cont in map(make_disjoint_window, rolling_windows(tokens, self.prefix_token_id, self.max_length)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        # distinct texts share no context worth caching: every window is scored whole, outside the engine
        with tqdm(
            total=len(windows), desc="loglikelihood_rolling", disable=disable_tqdm or not self.llm.progress
        ) as bar:
            for w, (logprob, _) in self._score_whole(windows, list(range(len(windows)))):
                totals[owners[w]] += logprob
                bar.update(1)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation
    def _sampling_params(self, gen_kwargs: dict, index: int) -> tuple[SamplingParams, list[str], int]:
        """lm-eval's generation kwargs as ``SamplingParams``; also the stop strings and the context budget."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos = self.engine_tokenizer.eos_token
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        if not 1 <= max_gen_toks < self.max_length:
            raise ValueError(f"max_gen_toks={max_gen_toks} must be in [1, max_length={self.max_length})")
        do_sample, temperature = kwargs.pop("do_sample"), float(kwargs.pop("temperature", 0.0))
        unknown = sorted(set(kwargs) - set(SAMPLING_KWARGS))
        if unknown:
            raise ValueError(f"generation kwargs {unknown} are not supported by gpt2-triton")
        params = SamplingParams(
            max_tokens=max_gen_toks,
            temperature=temperature if do_sample else 0.0,
            stop=[s for s in until if s] or None,
            seed=None if self.seed is None or not do_sample else self.seed + index,
            **{k: kwargs[k] for k in SAMPLING_KWARGS if k in kwargs},
        )
        return params, until, self.max_length - max_gen_toks

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Every request in one ``LLM.generate``; the text cut at the first stop string, as the hf backend does."""
        if not requests:
            return []
        prompts, params, stops = [], [], []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            p, until, context_budget = self._sampling_params(gen_kwargs, i)
            ids = self.tok_encode(context)[-context_budget:] or [self.prefix_token_id]  # nothing to condition on
            prompts.append(ids)
            params.append(p)
            stops.append(until)
        outputs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm and self.llm.progress,
                                    lora_request=self.lora_request)  # fmt: skip
        texts = []
        for req, out, until in zip(requests, outputs, stops):
            text = postprocess_generated_text(out.outputs[0].text, until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            texts.append(text)
        return texts


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows (context length 1): every token predicted once, each window as full as it can be."""
    return get_rolling_token_windows(token_list=tokens, prefix_token=prefix_token, max_seq_len=max_length,
                                     context_len=1)  # fmt: skip
