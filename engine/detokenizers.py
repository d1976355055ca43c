"""The detokenizers and word counts of the GPT-2 paper's zero-shot evaluation (Radford et al. 2019, section 3.1).

The benchmarks ship pre-tokenized text ("the company 's shares rose 5 % ."); GPT-2 reads raw text, so the paper
scores a detokenized version and normalizes the log-likelihood by the number of *original* tokens, to stay
comparable with models that read the tokenized text. These functions are that step, one per corpus.
"""

from __future__ import annotations

import re

# (pattern, replacement) pairs applied in order; each undoes one habit of PTB-style tokenization
_PTB_RULES = [
    (r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1"),  # "do n't" -> "don't", "company 's" -> "company's"
    (r"s ' ", "s' "),  # plural possessive
    (r" ([.,;:!?%)\]}])", r"\1"),  # no space before closing punctuation
    (r"([(\[{$]) ", r"\1"),  # none after opening punctuation
    (r"\\/", "/"),
    (r"\\\*", "*"),
    (r"-LRB- ?", "("),
    (r" ?-RRB-", ")"),
    (r"`` ", '"'),
    (r" ''", '"'),
]


def ptb_detokenizer(text: str) -> str:
    """Penn Treebank (Mikolov's LM version: lowercase, ``<unk>``, ``N`` for numbers) back to plain text."""
    for pattern, replacement in _PTB_RULES:
        text = re.sub(pattern, replacement, text)
    return text


def wikitext_detokenizer(text: str) -> str:
    """WikiText's tokenization (``@-@`` separators, spaced punctuation, ``= = Heading = =``) undone: lm-eval's
    own detokenizer, the one its ``wikitext`` task uses, so both columns read the same text."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer as lm_eval_detokenizer

    return lm_eval_detokenizer({"page": text})


def lm1b_detokenizer(text: str) -> str:
    """One Billion Word sentences are tokenized like PTB, without its lowercasing or placeholders."""
    return ptb_detokenizer(text)


def cbt_detokenizer(text: str) -> str:
    """Children's Book Test text: PTB-style tokens, with ``` `` ``/``''`` quotes."""
    return ptb_detokenizer(text)


def count_words(text: str, lines_end_with_eos: bool = False) -> int:
    """Tokens of the original, tokenized text: its whitespace-separated words, plus one ``<eos>`` per line where the
    benchmark counts one (PTB and 1BW, as in the word-level language-modelling convention)."""
    words = len(text.split())
    return words + (sum(1 for line in text.split("\n") if line.strip()) if lines_end_with_eos else 0)
