"""``OutputProcessor``: from sampled tokens to what the user sees (vLLM v1's detokenizer and output processor).

For every new token of a sequence it records the token and its log-probs, detokenizes incrementally, and checks
the stop conditions: EOS (unless ``ignore_eos``), a stop token, a stop string, ``max_tokens``. EOS and stop tokens
end the sequence without adding their text; a stop string is cut off with what follows it. None of them applies to
the first ``min_tokens`` tokens (vLLM's rule; a stop string must end in the text of a later token), only
``max_tokens`` does. While a sequence runs, its visible text holds back the last ``len(longest stop string) - 1``
characters, which a stop string may yet claim, so a stream never shows text that the final output does not have.
"""

from __future__ import annotations

import dataclasses

from engine.outputs import CompletionOutput, RequestOutput
from engine.sequence import Request, Sequence


class OutputProcessor:
    def __init__(self, eos_token_id: int | None) -> None:
        self.eos_token_id = eos_token_id

    def add_request(self, request: Request, tokenizer) -> None:
        """Give each sequence of a request its incremental detokenizer, when the request wants text."""
        if not request.detokenize:
            return
        from engine.tokenizer import IncrementalDecoder

        for seq in request.seqs:
            seq.detokenizer = IncrementalDecoder(tokenizer)

    def append_token(self, seq: Sequence, token: int, logprob: float, top: dict[int, float] | None) -> None:
        """Record a sampled token and finish the sequence if it meets a stop condition."""
        seq.output_token_ids.append(token)
        seq.output_logprobs.append(logprob)
        if top is not None:
            seq.top_logprobs.append(top)
        self._check_stop(seq, token)
        if seq.is_finished and seq.detokenizer is not None:
            seq.text += seq.detokenizer.flush()  # bytes of an unfinished character, as replacement characters

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        may_stop = len(seq.output_token_ids) > p.min_tokens  # the first min_tokens tokens never stop it (vLLM)
        if may_stop and token == self.eos_token_id and not p.ignore_eos:
            return seq.finish("stop")
        if may_stop and p.stop_token_ids and token in p.stop_token_ids:
            return seq.finish("stop", token)
        if seq.detokenizer is not None:
            before = len(seq.text)
            seq.text += seq.detokenizer.push(token)
            for s in (p.stop or ()) if may_stop else ():
                cut = seq.text.find(s, max(0, before - len(s) + 1))
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    return seq.finish("stop", s)
        if len(seq.output_token_ids) >= p.max_tokens:
            seq.finish("length")

    @staticmethod
    def visible_text(seq: Sequence) -> str:
        """The text a stream may show: all of it once finished, else short of what a stop string may still claim."""
        if seq.is_finished or not seq.params.stop:
            return seq.text
        hold = max(len(s) for s in seq.params.stop) - 1
        return seq.text[: max(len(seq.text) - hold, 0)]

    def make_output(self, request: Request) -> RequestOutput:
        """The request's outputs so far (cumulative), one completion per sample."""
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[self._completion(seq) for seq in request.seqs],
            finished=request.finished,
            num_cached_tokens=request.num_cached_tokens or 0,
            prompt_logprobs=list(request.prompt_logprobs) if request.params.prompt_logprobs is not None else None,
            metrics=dataclasses.replace(request.metrics),  # a snapshot: the request's own keeps changing
        )

    def _completion(self, seq: Sequence) -> CompletionOutput:
        return CompletionOutput(
            index=seq.sample_index,
            text=self.visible_text(seq),
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.top_logprobs) if seq.params.logprobs is not None else None,
            stop_reason=seq.stop_reason,
        )
