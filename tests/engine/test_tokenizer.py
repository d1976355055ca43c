"""GPT-2 tokenizer: files rebuilt from tiktoken's ranks, parity with transformers and with OpenAI's merge-pair BPE.

Two independent references encode every text: transformers' GPT2Tokenizer (the Rust ``tokenizers`` BPE over
vocab.json/merges.txt) and ``MergesBPE`` below, a pure-Python port of the algorithm in OpenAI's encoder.py
(merge the highest-priority *pair* from merges.txt), whereas the engine runs tiktoken's rank BPE.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
import types
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import tiktoken

from engine.tokenizer import (
    WHISPER_GPT2_SHA256,
    IncrementalDecoder,
    Tokenizer,
    bytes_to_unicode,
    find_whisper_gpt2_ranks,
    load_tokenizer,
    ranks_from_hf_files,
    read_tiktoken_file,
    write_hf_files,
)

EOS = "<|endoftext|>"
# transformers' / OpenAI's spelling of the pre-tokenizer regex (tiktoken's is written differently).
HF_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class MergesBPE:
    """OpenAI's GPT-2 encoder algorithm over vocab.json + merges.txt: repeatedly merge the best-ranked pair."""

    def __init__(self, directory: Path):
        self.vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
        self.pair_rank = {tuple(line.split()): i for i, line in enumerate(lines)}
        self.byte_char = bytes_to_unicode()
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, word: str) -> tuple[str, ...]:
        parts = list(word)
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda p: self.pair_rank.get(p, float("inf")))
            if best not in self.pair_rank:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, chunk in enumerate(text.split(EOS)):
            if k:
                ids.append(self.vocab[EOS])
            for word in HF_PATTERN.findall(chunk):
                spelled = "".join(self.byte_char[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[p] for p in self.bpe(spelled))
        return ids


# ---------------------------------------------------------------- random text ------------------------------------


def _word() -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    w = "".join(random.choice(letters) for _ in range(random.randint(1, 12)))
    return random.choice([w, w.capitalize(), w.upper()])


def _codepoints(lo: int, hi: int, n: int) -> str:
    return "".join(chr(random.randint(lo, hi)) for _ in range(n))


def _any_char() -> str:
    while True:
        c = random.randint(0, 0x10FFFF)
        if not 0xD800 <= c <= 0xDFFF:  # lone surrogates cannot be UTF-8 encoded
            return chr(c)


_PIECES = [
    lambda: _word(),
    lambda: " " + _word(),
    lambda: _word() + random.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'x", "'"]),
    lambda: random.choice(["don't", "I'll", "we've", "they're", "she's", "I'd", "I'm", "DON'T", "y'all"]),
    lambda: "".join(random.choice(" \t\n\r\x0b\x0c\u00a0\u2009\u3000") for _ in range(random.randint(1, 6))),
    lambda: " " * random.randint(1, 9),
    lambda: "\n" * random.randint(1, 4),
    lambda: "".join(random.choice("0123456789") for _ in range(random.randint(1, 12))),
    lambda: f"{random.uniform(-1e6, 1e6):.{random.randint(0, 6)}f}",
    lambda: "".join(random.choice("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'") for _ in range(random.randint(1, 5))),
    lambda: random.choice(["café", "naïve", "résumé", "Ångström", "straße", "e\u0301", "ﬁ", "İstanbul", "Ωμέγα"]),
    lambda: _codepoints(0x00C0, 0x024F, random.randint(1, 6)),  # Latin with diacritics
    lambda: _codepoints(0x0400, 0x04FF, random.randint(1, 6)),  # Cyrillic
    lambda: _codepoints(0x0600, 0x06FF, random.randint(1, 6)),  # Arabic
    lambda: _codepoints(0x0900, 0x097F, random.randint(1, 6)),  # Devanagari (combining marks)
    lambda: _codepoints(0x4E00, 0x9FFF, random.randint(1, 8)),  # CJK
    lambda: _codepoints(0x3040, 0x30FF, random.randint(1, 6)),  # kana
    lambda: _codepoints(0xAC00, 0xD7A3, random.randint(1, 4)),  # Hangul
    lambda: _codepoints(0x1F300, 0x1FAFF, random.randint(1, 4)),  # emoji
    lambda: random.choice(["👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🏳️‍🌈", "1️⃣"]),
    lambda: "".join(_any_char() for _ in range(random.randint(1, 4))),
    lambda: _codepoints(0x00, 0x1F, random.randint(1, 3)),  # control characters
    lambda: random.choice([EOS, " " + EOS, EOS + " ", "<|endoftext", "|>", "<|endoftext|" + EOS]),
]


def random_text() -> str:
    """A fresh mix of words, whitespace runs, digits, punctuation, scripts, emoji and the special token."""
    text = "".join(random.choice(_PIECES)() for _ in range(random.randint(1, 30)))
    return text + " " * random.choice([0, 0, 1, 3])  # trailing spaces


FIXED = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t\t x",
    "hello   world",
    "hello \n\n world",
    "trailing spaces   ",
    "don't I'll we've they're she's I'd I'm",
    "DON'T I'LL WE'VE",
    "12345678901234567890 3.14159 1,000,000",
    "日本語のテキストと中文",
    "café naïve résumé Ångström",
    "emoji 🤖👍🏽👨‍👩‍👧 and flags 🇯🇵",
    "a<|endoftext|>b",
    "<|endoftext|><|endoftext|>",
    " <|endoftext|> ",
    "<|endoftext|",
    "x \r\n y\u00a0z\u3000w",
    "def f(x):\n    return x  # comment\n\n",
]


# ---------------------------------------------------------------- fixtures ---------------------------------------


@pytest.fixture(scope="module")
def ranks(gpt2_ranks_file):
    return read_tiktoken_file(gpt2_ranks_file)


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir):
    return load_tokenizer(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def merges_bpe(gpt2_tokenizer_dir):
    return MergesBPE(gpt2_tokenizer_dir)


@pytest.fixture(scope="module", params=["GPT2Tokenizer(vocab, merges)", "GPT2TokenizerFast.from_pretrained"])
def hf_tokenizer(request, gpt2_tokenizer_dir):
    import transformers

    d = gpt2_tokenizer_dir
    if request.param == "GPT2Tokenizer(vocab, merges)":
        # transformers 5.x: GPT2Tokenizer(vocab_file=..., merges_file=...) silently builds an EMPTY tokenizer;
        # the file paths must go to vocab= and merges=.
        hf = transformers.GPT2Tokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    else:
        hf = transformers.GPT2TokenizerFast.from_pretrained(str(d))
    assert len(hf) == 50257 and hf.eos_token_id == 50256
    return hf


def hf_encode(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def hf_decode(hf, ids: list[int], skip_special_tokens: bool = False) -> str:
    return hf.decode(ids, clean_up_tokenization_spaces=False, skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------- rank file and HF files ------------------------


def test_whisper_rank_file(gpt2_ranks_file, ranks):
    """The shipped file is GPT-2's: right hash, 256 bytes + 50000 merges with contiguous ranks."""
    assert hashlib.sha256(Path(gpt2_ranks_file).read_bytes()).hexdigest() == WHISPER_GPT2_SHA256
    assert sorted(ranks.values()) == list(range(50256))
    assert ranks[b"Hello"] == 15496 and ranks[b" the"] == 262 and ranks[b"!"] == 0


def test_bytes_to_unicode_matches_gpt2():
    """GPT-2's published spellings: space=Ġ, newline=Ċ, tab=ĉ, NUL=Ā, DEL=ġ, NBSP=ł, soft hyphen=Ń."""
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert [table[b] for b in (0x20, 0x0A, 0x09, 0x00, 0x7F, 0xA0, 0xAD)] == list("ĠĊĉĀġłŃ")
    assert all(table[b] == chr(b) for b in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)])


def test_hf_files_round_trip(gpt2_tokenizer_dir, ranks):
    """vocab.json/merges.txt rebuilt from the ranks read back to the same ranks, in GPT-2's layout."""
    d = gpt2_tokenizer_dir
    assert ranks_from_hf_files(d / "vocab.json", d / "merges.txt") == ranks
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab[EOS] == 50256 and vocab["Ġthe"] == 262
    lines = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == "" and len(lines) == 50002
    assert lines[1:6] == ["Ġ t", "Ġ a", "h e", "i n", "r e"]  # the first merges of OpenAI's vocab.bpe
    assert all(EOS not in line for line in lines)


def test_hf_files_round_trip_random_prefix(tmp_path, ranks):
    """Any rank prefix is itself a BPE vocabulary: write + read must return it unchanged."""
    n = random.randint(257, 50256)
    prefix = {tok: r for tok, r in ranks.items() if r < n}
    write_hf_files(prefix, tmp_path)
    assert ranks_from_hf_files(tmp_path / "vocab.json", tmp_path / "merges.txt") == prefix
    tok, reference = load_tokenizer(tmp_path), MergesBPE(tmp_path)
    assert tok.vocab_size == n + 1 and tok.eos_token_id == n
    for _ in range(20):
        text = random_text()
        ids = tok.encode(text)
        assert ids == reference.encode(text) and max(ids, default=0) <= n and tok.decode(ids) == text


# ---------------------------------------------------------------- parity ------------------------------------------


def test_known_ids(tokenizer):
    """Anchors from transformers' GPT2Tokenizer docstring, independent of how the files were rebuilt."""
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(" Hello world") == [18435, 995]
    assert tokenizer.encode(EOS) == [50256]
    assert tokenizer.eos_token_id == 50256 and tokenizer.eos_token == EOS and tokenizer.vocab_size == 50257


@pytest.mark.parametrize("text", FIXED)
def test_fixed_texts_match_references(text, tokenizer, hf_tokenizer, merges_bpe):
    ids = tokenizer.encode(text)
    assert ids == hf_encode(hf_tokenizer, text)
    assert ids == merges_bpe.encode(text)
    assert tokenizer.decode(ids) == text == hf_decode(hf_tokenizer, ids)


def test_random_texts_match_references(tokenizer, hf_tokenizer, merges_bpe):
    """Fresh random texts each run: identical ids to both references, and decode(encode(x)) == x."""
    for _ in range(200):
        text = random_text()
        ids = tokenizer.encode(text)
        assert ids == hf_encode(hf_tokenizer, text), text
        assert ids == merges_bpe.encode(text), text
        assert tokenizer.decode(ids) == text
        assert hf_decode(hf_tokenizer, ids) == text


def test_split_special_tokens_spells_them_as_text_like_transformers(gpt2_tokenizer_dir, tokenizer, hf_tokenizer):
    """``split_special_tokens=True`` (per call or per tokenizer) encodes ``<|endoftext|>`` as ordinary characters,
    as transformers' option of that name does; the default keeps it one token."""
    texts = [t for t in FIXED if "<|" in t] + [random_text() + EOS + random_text() for _ in range(20)]
    literal = load_tokenizer(gpt2_tokenizer_dir)
    literal.split_special_tokens = True
    for text in texts:
        want = hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert tokenizer.encode(text, split_special_tokens=True) == want == literal.encode(text), text
        assert literal.encode(text, split_special_tokens=False) == tokenizer.encode(text) == hf_encode(hf_tokenizer,
                                                                                                      text)  # fmt: skip
        assert 50256 not in want and literal.decode(want) == text
    assert tokenizer.encode(EOS) == [50256] and len(literal.encode(EOS)) > 1


def test_decode_invalid_utf8_matches_hf(tokenizer, hf_tokenizer):
    """Arbitrary id sequences (partial characters included) decode with U+FFFD exactly as transformers does, with
    ``<|endoftext|>`` and without it (``skip_special_tokens``: its neighbours' bytes then join)."""
    for _ in range(100):
        ids = [random.randrange(tokenizer.vocab_size) for _ in range(random.randint(1, 12))]
        ids += [random.randrange(188, 256) for _ in range(random.randint(0, 3))]  # lone high bytes
        ids += random.choice([[], [50256]])
        random.shuffle(ids)
        assert tokenizer.decode(ids) == tokenizer.decode_bytes(ids).decode("utf-8", errors="replace")
        assert tokenizer.decode(ids) == hf_decode(hf_tokenizer, ids), ids
        skipped = tokenizer.decode(ids, skip_special_tokens=True)
        assert skipped == hf_decode(hf_tokenizer, ids, skip_special_tokens=True), ids


def test_rank_file_and_hf_files_agree(gpt2_ranks_file, tokenizer):
    from_file = load_tokenizer(gpt2_ranks_file)
    assert (from_file.vocab_size, from_file.eos_token_id) == (tokenizer.vocab_size, tokenizer.eos_token_id)
    for _ in range(100):
        text = random_text()
        assert from_file.encode(text) == tokenizer.encode(text)


# ---------------------------------------------------------------- streaming --------------------------------------


def _stream(tokenizer, ids):
    dec = IncrementalDecoder(tokenizer)
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.flush()


def test_incremental_decoder_matches_decode(tokenizer):
    for _ in range(50):
        text = random_text()
        ids = tokenizer.encode(text)
        deltas, rest = _stream(tokenizer, ids)
        assert "".join(deltas) + rest == text == tokenizer.decode(ids)
        assert rest == ""  # valid text: the last token completes the last character
    for _ in range(50):  # arbitrary ids: invalid UTF-8 is replaced exactly as one-shot decode does
        ids = [random.choice([random.randrange(tokenizer.vocab_size), random.randrange(128, 256)]) for _ in range(9)]
        deltas, rest = _stream(tokenizer, ids)
        assert "".join(deltas) + rest == tokenizer.decode(ids)


def test_incremental_decoder_holds_partial_characters(tokenizer, ranks):
    """A character split over byte tokens appears only when its last byte arrives."""
    char = random.choice(["é", "日", "🤖", "€"])
    byte_ids = [ranks[bytes([b])] for b in char.encode()]
    dec = IncrementalDecoder(tokenizer)
    assert [dec.push(i) for i in byte_ids] == [""] * (len(byte_ids) - 1) + [char]
    assert dec.flush() == ""
    dec.push(byte_ids[0])
    assert dec.flush() == "\ufffd"  # an unfinished character at the end of the stream
    assert dec.push(ranks[b"a"]) == "a"  # and flush reset the state
    dec.push(byte_ids[0])
    assert dec.push(ranks[b"a"]) == "\ufffda"  # a whole-character token after a partial one ends it, replaced
    assert dec.push(ranks[b"a"]) == "a" and dec.flush() == ""


# ---------------------------------------------------------------- errors -----------------------------------------


def test_find_whisper_gpt2_ranks_checks_hash(tmp_path, monkeypatch):
    import importlib.util

    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "gpt2.tiktoken").write_text("IQ== 0\n")
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: fake if name == "whisper" else None)
    with pytest.raises(ValueError, match="sha256"):
        find_whisper_gpt2_ranks()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert find_whisper_gpt2_ranks() is None


def test_load_tokenizer_default(monkeypatch, ranks):
    """None: tiktoken's gpt2 encoding; offline, whisper's rank file; with neither, a ValueError saying what to do."""
    import engine.tokenizer as mod

    encoding = tiktoken.Encoding("gpt2", pat_str=mod.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOS: 50256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)
    assert load_tokenizer().encode("Hello world" + EOS) == [15496, 995, 50256]

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    assert load_tokenizer(None).encode(" Hello world") == [18435, 995]  # from whisper's file
    monkeypatch.setattr(mod, "find_whisper_gpt2_ranks", lambda: None)
    with pytest.raises(ValueError, match="no GPT-2 tokenizer files were found.*vocab.json and merges.txt"):
        load_tokenizer()


def test_load_tokenizer_missing_paths(tmp_path, gpt2_tokenizer_dir):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "no-such-checkpoint")
    with pytest.raises(ValueError, match="vocab.json or merges.txt"):
        load_tokenizer(tmp_path)
    shutil.copy(gpt2_tokenizer_dir / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(ValueError, match=r"no merges\.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"merges\.txt not found"):
        ranks_from_hf_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(ValueError, match=r"vocab\.json not found"):
        ranks_from_hf_files(tmp_path / "missing" / "vocab.json", gpt2_tokenizer_dir / "merges.txt")
    with pytest.raises(ValueError, match="rank file not found"):
        read_tiktoken_file(tmp_path / "gpt2.tiktoken")


def _corrupt_vocab(text: str) -> str:
    vocab = json.loads(text)
    case = random.choice(["truncated", "list", "bad-char", "string-id"])
    if case == "truncated":
        return text[: random.randrange(1, len(text) - 1)]
    if case == "list":
        return json.dumps(list(vocab))
    if case == "bad-char":
        vocab["a b"] = 50257  # a raw space is not in GPT-2's byte alphabet
    else:
        vocab[random.choice(list(vocab))] = "7"
    return json.dumps(vocab)


def test_corrupt_hf_files(tmp_path, gpt2_tokenizer_dir):
    d = tmp_path / "ckpt"
    shutil.copytree(gpt2_tokenizer_dir, d)
    good_vocab = (d / "vocab.json").read_text(encoding="utf-8")
    (d / "vocab.json").write_text(_corrupt_vocab(good_vocab), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json"):
        load_tokenizer(d)
    (d / "vocab.json").write_text(good_vocab, encoding="utf-8")

    lines = (gpt2_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    i, j = sorted(random.sample(range(1, 50001), 2))
    swapped = lines.copy()
    swapped[i], swapped[j] = swapped[j], swapped[i]
    dropped = lines[:i] + lines[i + 1 :]
    garbled = lines[:i] + [lines[i].replace(" ", "")] + lines[i + 1 :]
    resplit = lines.copy()  # ids still in order, but a merge that is not the split BPE reaches
    vocab = json.loads(good_vocab)
    for k in random.sample(range(1, 50001), 50000):
        merged = lines[k].replace(" ", "")
        cuts = [
            c
            for c in range(1, len(merged))
            if max(vocab.get(merged[:c], 1e9), vocab.get(merged[c:], 1e9)) < vocab[merged]
        ]
        cuts = [c for c in cuts if f"{merged[:c]} {merged[c:]}" != lines[k]]
        if cuts:
            c = random.choice(cuts)
            resplit[k] = f"{merged[:c]} {merged[c:]}"
            break
    assert resplit != lines
    cases = [(swapped, "out of order"), (dropped, "merges for"), (garbled, "expected two tokens"), (resplit, "BPE")]
    for broken, why in cases:
        (d / "merges.txt").write_text("\n".join(broken), encoding="utf-8")
        with pytest.raises(ValueError, match=rf"merges\.txt.*{why}"):
            load_tokenizer(d)


def test_corrupt_tiktoken_file(tmp_path, gpt2_ranks_file):
    lines = Path(gpt2_ranks_file).read_text().splitlines()
    k = random.randrange(len(lines))
    token, rank = lines[k].split()
    cases = {
        "not-base64": lines[:k] + [f"@@{token} {rank}"] + lines[k + 1 :],
        "no-rank": lines[:k] + [token] + lines[k + 1 :],
        "bad-rank": lines[:k] + [f"{token} x{rank}"] + lines[k + 1 :],
        "duplicate": lines + [f"{token} 99999"],
        "missing-byte": [
            line for line in lines if len(base64.b64decode(line.split()[0])) != 1 or random.random() < 0.9
        ],
        "empty": [],
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.tiktoken"
        path.write_text("\n".join(content) + "\n")
        with pytest.raises(ValueError, match=regex.escape(str(path))):
            load_tokenizer(path)
    binary = tmp_path / "binary.tiktoken"
    binary.write_bytes(bytes(random.randrange(128, 256) for _ in range(64)))
    with pytest.raises(ValueError, match="binary.tiktoken"):
        read_tiktoken_file(binary)


def test_write_hf_files_rejects_non_bpe_ranks(tmp_path, ranks):
    """A token that BPE over lower ranks cannot reach in two parts has no merge line to write."""
    base = {tok: r for tok, r in ranks.items() if len(tok) == 1}
    with pytest.raises(ValueError, match="not a merge of two lower-ranked tokens"):
        write_hf_files({**base, b"xyz": 256}, tmp_path)
    gone = bytes([random.randrange(256)])
    with pytest.raises(ValueError, match="single-byte"):
        write_hf_files({tok: r for tok, r in base.items() if tok != gone}, tmp_path)


def test_decode_rejects_unknown_ids(tokenizer):
    bad = random.choice([-1, tokenizer.vocab_size, tokenizer.vocab_size + random.randint(1, 10**6)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([15496, bad])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IncrementalDecoder(tokenizer).push(bad)


def test_from_ranks_rejects_eos_collision(ranks):
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_ranks(ranks, eos_token_id=random.randrange(50256))


def test_load_tokenizer_accepts_a_tokenizer_file_path(gpt2_tokenizer_dir):
    name = random.choice(["vocab.json", "merges.txt"])
    assert load_tokenizer(gpt2_tokenizer_dir / name).encode("Hello world") == [15496, 995]


def test_tokenizer_requires_eos():
    encoding = tiktoken.Encoding(
        "x", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={}
    )
    with pytest.raises(ValueError, match="endoftext"):
        Tokenizer(encoding)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_push_many_equals_pushing_one_by_one(tokenizer, skip_special_tokens):
    """Byte-level tokens (ids below 256 include lone UTF-8 lead and continuation bytes) split characters across
    tokens: the text of a run of tokens at once equals the tokens pushed one at a time, flush included, and the
    one-shot decode's, ``<|endoftext|>`` skipped or not."""
    from engine.tokenizer import IncrementalDecoder

    ids = [random.choice([random.randrange(256), random.randrange(50257), 50256]) for _ in range(200)]
    one, many = (IncrementalDecoder(tokenizer, skip_special_tokens) for _ in range(2))
    cut = random.randrange(len(ids))
    text_one = "".join(one.push(t) for t in ids) + one.flush()
    text_many = many.push_many(ids[:cut]) + many.push_many(ids[cut:]) + many.flush()
    assert text_one == text_many == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert ("<|endoftext|>" in text_one) != skip_special_tokens
    assert [tokenizer.token_bytes(t) for t in ids[:20]] == [tokenizer.decode_bytes([t]) for t in ids[:20]]
    with pytest.raises(ValueError, match="50257"):
        tokenizer.token_bytes(50257)
