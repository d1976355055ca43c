"""``OutputProcessor``: from sampled tokens to what the user sees (vLLM v1's detokenizer and output processor).

For every new token of a sequence it records the token and its log-probs, detokenizes incrementally, and checks the
stop conditions: EOS (unless ``ignore_eos``), a stop token, a stop string, ``max_tokens``. EOS and stop tokens end
the sequence without adding their text; a stop string is cut off with what follows it
(``include_stop_str_in_output`` keeps a stop string, and a stop token's text). None of them applies to the first
``min_tokens`` tokens (vLLM's rule; a stop string must end in the text of a later token), only ``max_tokens`` does.
An EOS kept inside an output (``ignore_eos``) adds no text either, unless ``skip_special_tokens=False``.
While a sequence runs, its visible text holds back the last ``len(longest stop string) - 1`` characters, which a
stop string may yet claim, so a stream never shows text that the final output does not have.

Each step's output follows the request's ``output_kind``: everything so far (the engine's default), only what is
new (``DELTA``, for streams), or nothing until the end (``FINAL_ONLY``, what ``LLM.generate`` and a non-streamed
server request ask for). A final-only request without stop strings is detokenized once, when it finishes.
"""

from __future__ import annotations

from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.sequence import Request, Sequence

# read for every sequence at every step: module constants (an enum member found through its class costs 0.1 us)
_FINAL_ONLY, _DELTA = RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA


class OutputProcessor:
    def __init__(self, eos_token_id: int | None) -> None:
        self.eos_token_id = eos_token_id

    def add_request(self, request: Request, tokenizer) -> None:
        """Give each sequence of a request its incremental detokenizer, when the request wants text."""
        if not request.detokenize:
            return
        from engine.tokenizer import IncrementalDecoder

        for seq in request.seqs:
            seq.detokenizer = IncrementalDecoder(tokenizer, request.params.skip_special_tokens)

    def append_token(self, seq: Sequence, token: int, logprob: float, top: dict[int, float] | None) -> None:
        """Record a sampled token and finish the sequence if it meets a stop condition.

        The text grows token by token when something reads it before the end (stop strings, streamed or cumulative
        outputs); a final-only output without stop strings detokenizes all its tokens at once when it finishes."""
        seq.output_token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.grammar is not None and token != self.eos_token_id:  # EOS ends a structured output (no ignore_eos)
            seq.grammar.advance(token)
        if top is not None:
            seq.top_logprobs.append(top)
        p = seq.params
        count = len(seq.output_token_ids)
        may_stop = count > p.min_tokens  # the first min_tokens tokens never stop it (vLLM)
        if may_stop and token == self.eos_token_id and not p.ignore_eos:
            return self._finish(seq, "stop", None, text_upto=count - 1)  # EOS adds no text
        if may_stop and p.stop_token_ids and token in p.stop_token_ids:
            return self._finish(seq, "stop", token, text_upto=count if p.include_stop_str_in_output else count - 1)
        if seq.detokenizer is not None and (p.stop or p.output_kind is not _FINAL_ONLY):
            before = len(seq.text)
            if seq.num_detokenized == count - 1:  # a stream's every step: this token, inline
                seq.text += seq.detokenizer.push(token)
                seq.num_detokenized = count
            else:
                self._detokenize(seq, count)
            for s in p.stop if may_stop and p.stop else ():
                cut = seq.text.find(s, max(0, before - len(s) + 1))
                if cut >= 0:  # the stop string (unless kept) and anything after it, partial bytes included
                    seq.text = seq.text[: cut + len(s) if p.include_stop_str_in_output else cut]
                    return self._finish(seq, "stop", s, text_upto=None)
        if count >= p.max_tokens:
            self._finish(seq, "length", None, text_upto=count)

    @staticmethod
    def _detokenize(seq: Sequence, upto: int) -> None:
        """Append the text of output tokens ``num_detokenized .. upto`` to ``seq.text``."""
        if upto > seq.num_detokenized:
            seq.text += seq.detokenizer.push_many(seq.output_token_ids[seq.num_detokenized : upto])
            seq.num_detokenized = upto

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None, text_upto: int | None) -> None:
        """End ``seq``; its text takes the output tokens before ``text_upto`` and the bytes of an unfinished
        character as replacement characters (``None``: the text is final as it is)."""
        seq.finish(reason, stop_reason)
        if seq.detokenizer is not None and text_upto is not None:
            self._detokenize(seq, text_upto)
            seq.text += seq.detokenizer.flush()

    @staticmethod
    def visible_text(seq: Sequence) -> str:
        """The text a stream may show: all of it once finished, else short of what a stop string may still claim."""
        if seq.is_finished or not seq.params.stop:
            return seq.text
        hold = max(len(s) for s in seq.params.stop) - 1
        return seq.text[: max(len(seq.text) - hold, 0)]

    def make_output(self, request: Request, finished: bool) -> RequestOutput:
        """The request's output for this step, as its ``output_kind`` asks: everything so far, or what is new since
        its previous output (the caller asks for a final-only request's once, when it finishes). One completion per
        sample. ``finished``: whether the request is.

        It runs for every streamed request at every step: its objects are built from positional arguments (keyword
        arguments cost twice as much) and a delta's lists are slices of what is new only."""
        params = request.params
        delta = params.output_kind is _DELTA
        prompt_logprobs = None
        if params.prompt_logprobs is not None and not (delta and request.num_outputs):
            prompt_logprobs = list(request.prompt_logprobs)  # a delta stream sends them with its first output
        request.num_outputs += 1
        seqs = request.seqs
        if len(seqs) == 1:  # no list comprehension (a function call of its own in Python 3.11) for one sample
            completions = [self._completion(seqs[0], params, delta)]
        else:
            completions = [self._completion(seq, params, delta) for seq in seqs]
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            completions,
            finished,
            request.num_cached_tokens or 0,
            prompt_logprobs,
            request.metrics,  # frozen: the engine replaces it when a time is set
        )

    def _completion(self, seq: Sequence, params: SamplingParams, delta: bool) -> CompletionOutput:
        """``seq``'s output so far, or (``delta``) only what it produced since its previous output (empty if none)."""
        text = self.visible_text(seq) if params.stop else seq.text
        ids = seq.output_token_ids
        tokens = chars = 0
        if delta:
            tokens, chars = seq.num_sent_tokens, seq.num_sent_chars
            seq.num_sent_tokens, seq.num_sent_chars = len(ids), len(text)
        return CompletionOutput(
            seq.sample_index,
            text[chars:] if chars else text,
            ids[tokens:],  # a copy, as are the logprobs: the sequence's lists keep growing
            seq.cumulative_logprob,
            seq.finish_reason,
            seq.top_logprobs[tokens:] if params.logprobs is not None else None,
            seq.stop_reason,
        )
