"""GPT-2's byte-level BPE tokenizer on top of tiktoken, built offline from a checkpoint's own files.

Three sources give the same 50257-token vocabulary: a Hugging Face checkpoint's ``vocab.json`` + ``merges.txt``,
a tiktoken ``.tiktoken`` rank file (``base64(token) rank`` per line; openai-whisper ships GPT-2's), or
``tiktoken.get_encoding("gpt2")`` (downloads once, then cached). tiktoken merges the adjacent pair whose
*concatenation* has the lowest rank, while GPT-2's ``merges.txt`` lists merge *pairs* by priority. The two agree
when ids rise in merge order and each token's merge is the split that BPE over lower-ranked tokens reaches:
:func:`write_hf_files` writes merges that way and :func:`ranks_from_hf_files` refuses files that differ.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import tiktoken

# GPT-2's pre-tokenizer (tiktoken's spelling of the regex in OpenAI's encoder.py and transformers' GPT2Tokenizer).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS_TOKEN = "<|endoftext|>"
# sha256 of whisper/assets/gpt2.tiktoken (identical to tiktoken's own gpt2 ranks).
WHISPER_GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

_HOW_TO_PROVIDE = (
    "pass a directory holding vocab.json and merges.txt (every Hugging Face GPT-2 checkpoint ships them), "
    "or a .tiktoken rank file, or install openai-whisper (`pip install --no-deps openai-whisper`, it ships "
    "gpt2.tiktoken), or let tiktoken download its gpt2 encoding once (set TIKTOKEN_CACHE_DIR to keep it)"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, used to spell byte tokens as strings in vocab.json/merges.txt.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP, soft hyphen)
    map, in byte order, to the characters U+0100 onwards, so that no token string contains whitespace.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _token_to_str(token: bytes, table: dict[int, str]) -> str:
    """The vocab.json spelling of ``token``."""
    return "".join(table[b] for b in token)


def find_whisper_gpt2_ranks() -> Path | None:
    """Path of openai-whisper's ``assets/gpt2.tiktoken`` (sha256-checked), or None if whisper is not installed.

    ``find_spec`` locates the package without importing it (whisper imports torch, numba, ...).
    """
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "assets" / "gpt2.tiktoken"
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != WHISPER_GPT2_SHA256:
                raise ValueError(f"{path}: sha256 {digest} does not match GPT-2's rank file {WHISPER_GPT2_SHA256}")
            return path
    return None


def read_tiktoken_file(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file (``base64(token) rank`` per line) into ``{token bytes: rank}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ValueError(f"{path}: tiktoken rank file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ValueError(f"{path}: not a tiktoken rank file ({e})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f"{path}: line {lineno}: expected 'base64-token rank', got {line[:80]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error:
            raise ValueError(f"{path}: line {lineno}: {fields[0][:80]!r} is not base64") from None
        if token in ranks:
            raise ValueError(f"{path}: line {lineno}: token {token!r} appears twice")
        ranks[token] = int(fields[1])
    _check_ranks(ranks, str(path))
    return ranks


def _check_ranks(ranks: dict[bytes, int], where: str) -> None:
    """Reject rank tables tiktoken cannot use as a byte-level BPE (raises ValueError naming ``where``)."""
    if not ranks:
        raise ValueError(f"{where}: no tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{where}: {len(missing)} single-byte tokens are missing (e.g. byte {missing[0]})")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{where}: two tokens share a rank")
    if b"" in ranks or min(ranks.values()) < 0:
        raise ValueError(f"{where}: empty token or negative rank")


def _read_vocab(vocab_json: Path) -> dict[str, int]:
    """vocab.json as ``{token string: id}``, with a ValueError naming the file when it is missing or malformed."""
    try:
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{vocab_json}: vocab.json not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError, IsADirectoryError) as e:
        raise ValueError(f"{vocab_json}: not a valid vocab.json ({e})") from None
    if not isinstance(vocab, dict) or not all(type(v) is int for v in vocab.values()):
        raise ValueError(f"{vocab_json}: vocab.json must map token strings to integer ids")
    return vocab


def _read_merges(merges_txt: Path) -> list[tuple[str, str]]:
    """merges.txt as a list of ``(left, right)`` pairs in priority order (the ``#version`` header skipped)."""
    try:
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{merges_txt}: merges.txt not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ValueError(f"{merges_txt}: not a valid merges.txt ({e})") from None
    merges = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{merges_txt}: line {lineno}: expected two tokens, got {line[:80]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_hf_files(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> tuple[dict[bytes, int], int]:
    """Ranks and the ``<|endoftext|>`` id from vocab.json + merges.txt, checked to encode like transformers."""
    vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
    vocab = _read_vocab(vocab_json)
    merges = _read_merges(merges_txt)
    eos_id = vocab.pop(EOS_TOKEN, None)
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    try:
        spelled = {text: bytes(decoder[c] for c in text) for text in vocab}  # vocab.json string -> token bytes
    except KeyError as e:
        raise ValueError(f"{vocab_json}: character {e.args[0]!r} is not in GPT-2's byte-level alphabet") from None
    ranks = {spelled[text]: rank for text, rank in vocab.items()}
    if len(ranks) != len(vocab):
        raise ValueError(f"{vocab_json}: two token strings decode to the same bytes")
    _check_ranks(ranks, str(vocab_json))
    if eos_id is None:
        eos_id = max(ranks.values()) + 1
    elif eos_id in ranks.values():
        raise ValueError(f"{vocab_json}: {EOS_TOKEN} shares id {eos_id} with another token")

    # tiktoken merges the adjacent pair whose result has the lowest id; transformers merges the pair listed first.
    # They agree when ids rise in merges.txt order, every multi-byte token comes from exactly one merge, and that
    # merge is the split which BPE over lower-ranked tokens reaches (how write_hf_files builds merges.txt).
    if len(merges) != len(ranks) - 256:
        raise ValueError(f"{merges_txt}: {len(merges)} merges for {len(ranks) - 256} multi-byte tokens in vocab.json")
    previous = max(ranks[bytes([b])] for b in range(256))
    for lineno, (left, right) in enumerate(merges, 2):
        merged = left + right
        if left not in vocab or right not in vocab or merged not in vocab:
            raise ValueError(f"{merges_txt}: line {lineno}: merge {left!r} {right!r} uses a token not in vocab.json")
        rank = vocab[merged]
        if rank <= previous:
            raise ValueError(
                f"{merges_txt}: line {lineno}: merge {left!r} {right!r} makes id {rank}, out of order with "
                f"vocab.json (ids must increase with merge priority)"
            )
        if _bpe_parts(ranks, spelled[merged], rank) != [spelled[left], spelled[right]]:
            raise ValueError(
                f"{merges_txt}: line {lineno}: merge {left!r} {right!r} is not the split BPE reaches for "
                f"{merged!r}; tiktoken would encode differently from transformers"
            )
        previous = rank
    return ranks, eos_id


def ranks_from_hf_files(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> dict[bytes, int]:
    """tiktoken mergeable ranks from a checkpoint's vocab.json + merges.txt (``<|endoftext|>`` left out)."""
    return _read_hf_files(vocab_json, merges_txt)[0]


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of ``token`` using only ranks below ``max_rank``: repeatedly merge the lowest-ranked adjacent pair."""

    def pair_rank(i: int) -> int:  # rank of parts[i] + parts[i + 1], or max_rank when that is not usable
        return min(ranks.get(parts[i] + parts[i + 1], max_rank), max_rank)

    parts = [token[i : i + 1] for i in range(len(token))]
    pair_ranks = [pair_rank(i) for i in range(len(parts) - 1)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == max_rank:
            break
        i = pair_ranks.index(best)  # leftmost on ties, as tiktoken does
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = pair_rank(i - 1)
        if i < len(pair_ranks):
            pair_ranks[i] = pair_rank(i)
    return parts


def write_hf_files(ranks: dict[bytes, int], directory: str | os.PathLike) -> None:
    """Write GPT-2-style vocab.json + merges.txt for ``ranks``, with ``<|endoftext|>`` after the last rank.

    Each multi-byte token's merge is the two-part split that BPE over lower-ranked tokens reaches, so
    merge-pair BPE (transformers) and rank BPE (tiktoken) produce the same tokens.
    """
    _check_ranks(ranks, "ranks")
    if EOS_TOKEN.encode() in ranks:
        raise ValueError(f"ranks: {EOS_TOKEN} must not be an ordinary token")
    table = bytes_to_unicode()
    merges = ["#version: 0.2"]
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"ranks: token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append(f"{_token_to_str(parts[0], table)} {_token_to_str(parts[1], table)}")
    vocab = {_token_to_str(token, table): rank for token, rank in ranks.items()}
    vocab[EOS_TOKEN] = max(ranks.values()) + 1
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    # transformers' and OpenAI's readers drop the last line of merges.txt: it must end with a newline.
    (directory / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")


class Tokenizer:
    """GPT-2 text <-> token ids, encoding exactly like transformers' GPT2Tokenizer.

    ``<|endoftext|>`` written inside a text becomes token 50256, as transformers encodes it by default;
    ``split_special_tokens=True`` (transformers' name) spells it with ordinary tokens instead, as literal text.
    """

    eos_token: str = EOS_TOKEN

    def __init__(self, encoding: tiktoken.Encoding, split_special_tokens: bool = False):
        if EOS_TOKEN not in encoding.special_tokens_set:
            raise ValueError(f"tiktoken encoding {encoding.name!r} has no {EOS_TOKEN} token")
        if not isinstance(split_special_tokens, bool):
            raise ValueError(f"split_special_tokens must be a bool, got {split_special_tokens!r}")
        self.encoding = encoding
        self.split_special_tokens = split_special_tokens
        self.eos_token_id: int = encoding.eot_token
        self.vocab_size: int = encoding.n_vocab

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], eos_token_id: int | None = None, name: str = "gpt2") -> Tokenizer:
        """Build from mergeable ranks; ``<|endoftext|>`` defaults to the id after the last rank (50256)."""
        eos = max(ranks.values()) + 1 if eos_token_id is None else eos_token_id
        if eos in ranks.values():
            raise ValueError(f"eos_token_id {eos} is already the id of an ordinary token")
        encoding = tiktoken.Encoding(
            name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOS_TOKEN: eos}
        )
        return cls(encoding)

    def encode(self, text: str, split_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``<|endoftext|>`` inside the text becomes its special id, as in transformers,
        unless ``split_special_tokens`` (default: the tokenizer's setting) asks for it as ordinary text."""
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        if split:
            return self.encoding.encode(text, allowed_special=set(), disallowed_special=())
        return self.encoding.encode(text, allowed_special="all")

    def _ids(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as a list of ints, each checked to be a token of this vocabulary."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of ``ids`` (one token can hold part of a UTF-8 character)."""
        try:
            return self.encoding.decode_bytes(self._ids(ids))
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD, as transformers' ``errors="replace"`` does.
        ``skip_special_tokens`` (transformers' name) leaves ``<|endoftext|>`` out."""
        if skip_special_tokens:
            ids = [i for i in self._ids(ids) if i != self.eos_token_id]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (``ValueError`` for an id that is not in the vocabulary)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id!r} is outside the vocabulary [0, {self.vocab_size})")
        found = self._bytes_of[token_id]
        if found is None:
            raise ValueError(f"token id {token_id!r} is not in the vocabulary")
        return found

    @functools.cached_property
    def _bytes_of(self) -> list[bytes | None]:
        """Every token's bytes by id (None for an unused id), built on first use: a stream looks one up per token."""

        def lookup(token_id: int) -> bytes | None:
            try:
                return self.encoding.decode_single_token_bytes(token_id)
            except KeyError:
                return None

        return [lookup(i) for i in range(self.vocab_size)]

    @functools.cached_property
    def _text_of(self) -> list[str | None]:
        """Every token's text where its bytes are whole UTF-8 characters (None where they are not, and for an unused
        id), built on first use: a stream with no partial character pending takes a token's text from here."""

        def whole_text(token: bytes | None) -> str | None:
            try:
                return token.decode("utf-8") if token is not None else None
            except UnicodeDecodeError:
                return None

        return [whole_text(token) for token in self._bytes_of]

    def __repr__(self) -> str:
        return f"Tokenizer({self.encoding.name!r}, vocab_size={self.vocab_size})"


class IncrementalDecoder:
    """Streams text as tokens arrive, holding back the bytes of a UTF-8 character until it is complete;
    ``skip_special_tokens``: ``<|endoftext|>`` adds no text (as ``Tokenizer.decode`` with it leaves it out)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = False  # whether ``_utf8`` holds the first bytes of a character
        self._whole_texts = tokenizer._text_of
        self._skipped = tokenizer.eos_token_id if skip_special_tokens else None  # a token that adds no text

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial).

        It runs for every streamed token: a token of whole characters with nothing pending is its own text, looked
        up, without the incremental UTF-8 decoder's Python-level buffering."""
        if token_id == self._skipped:
            return ""
        if not self._partial and 0 <= token_id < len(self._whole_texts):
            text = self._whole_texts[token_id]
            if text is not None:
                return text
        return self._decode(self.tokenizer.token_bytes(token_id))

    def push_many(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete (the same as pushing them one by one)."""
        if len(token_ids) == 1:
            return self.push(token_ids[0])
        if self._skipped is not None:
            token_ids = [t for t in token_ids if t != self._skipped]
        return self._decode(self.tokenizer.decode_bytes(token_ids))

    def _decode(self, data: bytes) -> str:
        text = self._utf8.decode(data)
        self._partial = bool(self._utf8.getstate()[0])
        return text

    def flush(self) -> str:
        """End of stream: return what is left (an unfinished character becomes U+FFFD) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._partial = False
        return text


def _default_tokenizer() -> Tokenizer:
    """tiktoken's gpt2 encoding (network or its cache), else openai-whisper's rank file, else a clear error."""
    try:
        return Tokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:  # tiktoken raises requests/OS errors of many kinds when it cannot download
        reason = f"{type(e).__name__}: {e}"
    path = find_whisper_gpt2_ranks()
    if path is not None:
        return Tokenizer.from_ranks(read_tiktoken_file(path))
    raise ValueError(
        f"no GPT-2 tokenizer files were found (tiktoken.get_encoding('gpt2') failed: {reason}); " + _HOW_TO_PROVIDE
    )


def load_tokenizer(source: str | os.PathLike | None = None) -> Tokenizer:
    """GPT-2 tokenizer from a checkpoint directory (vocab.json + merges.txt), a .tiktoken file, or None (default)."""
    if source is None:
        return _default_tokenizer()
    path = Path(source)
    if path.name in ("vocab.json", "merges.txt") and path.is_file():
        path = path.parent  # a checkpoint's tokenizer file given instead of its directory
    if path.is_dir():
        missing = [name for name in ("vocab.json", "merges.txt") if not (path / name).is_file()]
        if missing:
            raise ValueError(f"{path}: no {' or '.join(missing)} found; " + _HOW_TO_PROVIDE)
        ranks, eos_id = _read_hf_files(path / "vocab.json", path / "merges.txt")
        return Tokenizer.from_ranks(ranks, eos_id)
    if path.is_file():
        return Tokenizer.from_ranks(read_tiktoken_file(path))
    raise ValueError(f"tokenizer source {path} does not exist; " + _HOW_TO_PROVIDE)
