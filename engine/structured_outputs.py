"""Structured outputs (vLLM's ``StructuredOutputsParams``): completions held to a JSON schema, any JSON object, a
regular expression, or one of a list of choices, built on outlines-core (the ``structured`` extra).

Each kind becomes a regular expression (a JSON schema through outlines-core's ``build_regex_from_schema``), and the
regular expression an ``Index`` over the tokenizer's vocabulary: for each state of its automaton, the tokens whose
bytes keep the text inside the language, EOS where the text is complete. Building an index takes from milliseconds
(a choice, a short regex) to seconds (any JSON object: 5 s for GPT-2's vocabulary on the Xeon), so an engine keeps
the ones it built. Each sequence walks its own ``Guide`` over the index: before each token is sampled, the tokens it
does not allow are masked (-inf, with the logit bias and penalties, so logprobs see the mask too); each token drawn
advances it. A completion therefore always matches, unless ``max_tokens`` cuts it first (finish reason "length").
The index allows only tokens whose bytes keep the text a prefix of the language, though not every such token: one
that runs through a complete match and on ("c" then "att" towards "cattle" when "cat" is also a choice) is left
out, so the text gets there by other tokens ("attle").
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

try:  # optional, not a dependency: numpy's unpackbits is the fast CPU path of unpack_bits
    import numpy as np
except ImportError:
    np = None

MAX_INDEXES = 32  # compiled indexes an engine keeps, least recently used dropped first
MAX_STATE_WORDS = 512  # states whose allowed-token words an index keeps (6 KB each for GPT-2's vocabulary)
# whitespace the JSON grammar allows between elements: one space at most, so that a model cannot pad its answer
# with whitespace until max_tokens (outlines-core's default allows runs of it)
WHITESPACE = r"[ ]?"


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a completion must be (exactly one field set): ``json`` (a JSON schema, as a dict or its JSON text),
    ``regex`` (in outlines-core's syntax, that of Rust's regex crate; matched in full), ``choice`` (one of these
    strings), or ``json_object`` (any JSON object)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice") if getattr(self, name) is not None]
        given += ["json_object"] * bool(self.json_object)
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, json_object; got "
                + (", ".join(given) or "none")
            )
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(
                f"structured_outputs.json must be a JSON schema (dict or str), got {type(self.json).__name__}"
            )
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"structured_outputs.regex must be a string, got {type(self.regex).__name__}")
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple))
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")

    def regex_pattern(self) -> str:
        """The regular expression a completion must match in full (``ValueError`` for a schema outlines-core cannot
        turn into one)."""
        if self.regex is not None:
            return self.regex
        if self.choice is not None:  # longest first: outlines-core's automaton stops at the first alternative that
            # matches, so a choice that is a prefix of another ("cat", "cattle") must come after it
            return "(" + "|".join(re.escape(c) for c in sorted(self.choice, key=len, reverse=True)) + ")"
        from outlines_core.json_schema import build_regex_from_schema

        schema = self.json if self.json is not None else {"type": "object"}
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            return build_regex_from_schema(text, WHITESPACE)
        except (ValueError, TypeError) as e:  # outlines-core's errors for what it cannot read or support
            raise ValueError(f"structured_outputs.json: {' '.join(str(e).split())}") from None


class GrammarCompiler:
    """An engine's indexes over one tokenizer's vocabulary, built on first use and kept (``MAX_INDEXES``)."""

    def __init__(self, tokenizer) -> None:
        try:
            import outlines_core
        except ImportError:
            raise ValueError("structured outputs need the structured extra: pip install -e '.[structured]'") from None
        self._oc = outlines_core
        eos = tokenizer.eos_token_id
        tokens: dict[bytes, list[int]] = {}
        for token_id in range(tokenizer.vocab_size):
            if token_id != eos:
                tokens.setdefault(tokenizer.token_bytes(token_id), []).append(token_id)
        self.vocab_size = tokenizer.vocab_size
        self._vocabulary = outlines_core.Vocabulary(eos, tokens)
        self._indexes: OrderedDict[str, tuple[object, StateWords]] = OrderedDict()  # pattern -> index, its words
        self._lock = threading.Lock()  # the server compiles in worker threads; the lock guards the dict only

    def grammar(self, params: StructuredOutputsParams) -> Grammar:
        """A fresh walk over the index of ``params`` (``ValueError`` naming the field for a pattern that cannot be
        compiled)."""
        pattern = params.regex_pattern()
        with self._lock:
            entry = self._indexes.get(pattern)
            if entry is not None:
                self._indexes.move_to_end(pattern)
        if entry is None:
            entry = self._compile(pattern, params), StateWords()
            with self._lock:
                self._indexes[pattern] = entry
                if len(self._indexes) > MAX_INDEXES:
                    self._indexes.popitem(last=False)
        index, words = entry
        return Grammar(self._oc.Guide(index), self.vocab_size, words)

    def _compile(self, pattern: str, params: StructuredOutputsParams):
        try:
            return self._oc.Index(pattern, self._vocabulary)
        except (ValueError, TypeError) as e:
            field = "regex" if params.regex is not None else "json" if params.json is not None else "choice"
            raise ValueError(f"structured_outputs.{field}: {' '.join(str(e).split())}") from None


class StateWords:
    """The allowed tokens' words of an index's states, kept once written (``MAX_STATE_WORDS``, least recently used
    dropped first): outlines-core writes a state's words by walking its allowed tokens, 60 us where most of the
    vocabulary is allowed (inside a JSON string), and the sequences of a batch keep coming back to the same states."""

    def __init__(self) -> None:
        self._words: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def write(self, guide, row: torch.Tensor) -> None:
        key = guide.get_state(), row.numel()
        words = self._words.get(key)
        if words is not None:
            self._words.move_to_end(key)
            row.copy_(words)
            return
        guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())
        self._words[key] = row.clone()
        if len(self._words) > MAX_STATE_WORDS:
            self._words.popitem(last=False)


class Grammar:
    """One sequence's place in its index: which tokens may come next, and advancing by the token drawn."""

    def __init__(self, guide, vocab_size: int, words: StateWords) -> None:
        self.guide = guide
        self.vocab_size = vocab_size
        self.words = words  # shared by every walk over the same index

    def write_words(self, row: torch.Tensor) -> None:
        """Write the allowed tokens' bits into ``row`` (int32, contiguous, on the CPU, ``ceil(vocab / 32)`` words:
        token ``t`` is bit ``t % 32`` of word ``t // 32``)."""
        self.words.write(self.guide, row)

    def allowed(self, vocab: int) -> torch.Tensor:
        """``[vocab]`` bool, True for the tokens that may come next."""
        return allowed_tokens([self], vocab, torch.device("cpu"))[0]

    def advance(self, token: int) -> None:
        self.guide.advance(token)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """``[R, W]`` int32 words to ``[R, n]`` bool, bit ``i`` of word ``j`` at column ``32 j + i``: numpy's
    ``unpackbits`` on the CPU (0.2 ms for 64 rows of GPT-2's vocabulary), shifts on a GPU."""
    if np is not None and words.device.type == "cpu":  # little-endian words: their bytes in bit order
        bits = np.unpackbits(words.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :n]
        return torch.from_numpy(bits.view(np.bool_))
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :n]


def allowed_tokens(grammars: list[Grammar], vocab: int, device: torch.device) -> torch.Tensor:
    """``[len(grammars), vocab]`` bool on ``device``, True where each grammar allows the token next: the grammars
    write their bits on the host, the packed words go to the device (an eighth of a bool mask's bytes) and are
    unpacked there. ``vocab`` may exceed the tokenizer's (a padded LM head): the extra tokens are not allowed."""
    words = torch.zeros(len(grammars), (max(vocab, grammars[0].vocab_size) + 31) // 32, dtype=torch.int32)
    for row, grammar in zip(words, grammars):
        grammar.write_words(row)
    return unpack_bits(words.to(device, non_blocking=True), vocab)
