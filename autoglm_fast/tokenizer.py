"""Tokenizers behind one interface, plus UTF-8-safe streaming detokenization.

`ByteTokenizer` needs no files (ids 0..255 are UTF-8 bytes), so presets and tests run offline;
`HFTokenizer` wraps a checkpoint's `tokenizer.json`. Media placeholder ids always come from the
config: the model splices image/audio embeddings at exactly those ids, so a tokenizer that
disagrees is an error, not something to paper over. A checkpoint directory without a tokenizer is
an error too (`TokenizerNotFoundError`), never a silent byte tokenizer: the byte tokenizer is for
presets, for checkpoints saved with it (a marker `tokenizer_config.json`), or when asked for by name.
"""
from __future__ import annotations

import codecs
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

from .config import AutoGLMPhoneConfig

SPECIAL_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                  "<|endoftext|>", "<think>", "</think>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|image|>", "<|begin_of_audio|>", "<|end_of_audio|>", "<|audio|>", "<|pad|>")
# A checkpoint's tokenizer may lack these: audio is ours (no public checkpoint), pad often aliases
# <|endoftext|>, and older GLM-4 tokenizers have no think tags (then "<think>" is plain text).
OPTIONAL_TOKENS = frozenset({"<think>", "</think>", "<|begin_of_audio|>", "<|end_of_audio|>", "<|audio|>",
                             "<|pad|>"})
GLM4_VOCAB_SIZE = 151552
# The byte tokenizer's own layout for a GLM-4-size vocabulary (so preset prompts look like real ones);
# a checkpoint's tokenizer never uses it: HFTokenizer reads every id from its file and the config.
GLM4_IDS = {"[gMASK]": 151331, "<sop>": 151333, "<|system|>": 151335, "<|user|>": 151336,
            "<|assistant|>": 151337, "<|observation|>": 151338, "<think>": 151350, "</think>": 151351}


BYTES = "bytes"  # the `tokenizer=` / `--tokenizer` value that asks for the byte tokenizer
TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
COMPANION_FILES = (TOKENIZER_CONFIG, "special_tokens_map.json", "chat_template.jinja")  # copied on save
BYTE_TOKENIZER_CLASS = "autoglm_fast.ByteTokenizer"  # tokenizer_config.json's class for the byte tokenizer


class TokenizerNotFoundError(ValueError):
    """A checkpoint directory with no tokenizer in it, and none named."""


def config_token_ids(config) -> dict[str, int]:
    """The special tokens whose ids the model config fixes (any family's config)."""
    return config.special_token_ids()


def _special_pattern(names: Iterable[str]) -> re.Pattern[str]:
    """Longest name first so that no special token matches a prefix of another."""
    return re.compile("(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + ")")


class Tokenizer(ABC):
    """What the chat renderer, the detokenizer and the server rely on."""
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    special_ids: dict[str, int]  # name -> id; several names may share an id (e.g. pad = endoftext)

    @abstractmethod
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """`allow_special=False` encodes special-token strings as plain text (use it for user content)."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int: ...

    @abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the files `load_tokenizer(directory, config)` reads back (stale tokenizer files go)."""


def _write_tokenizer_files(directory: str | Path, files: dict[str, str]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER_FILE, *COMPANION_FILES):
        if name not in files:
            (directory / name).unlink(missing_ok=True)  # another tokenizer's, from an earlier save
    for name, text in files.items():
        (directory / name).write_text(text)


class ByteTokenizer(Tokenizer):
    """ids 0..255 are UTF-8 bytes; special tokens take the config's ids, GLM-4's ids for the real
    vocabulary, else the lowest free ids from 256. Other ids decode as `<|reserved_N|>` (a special
    token), so any sampled id from a random-weight model decodes."""

    def __init__(self, config: AutoGLMPhoneConfig):
        vocab = config.text.vocab_size
        fixed = config_token_ids(config)
        used = set(fixed.values()) | set(config.eos_token_ids)
        low = sorted(i for i in used if i < 256)
        if low:
            raise ValueError(f"config special ids {low} collide with the byte tokenizer's byte ids 0..255")
        rest = [n for n in SPECIAL_TOKENS if n not in fixed]
        if vocab == GLM4_VOCAB_SIZE and not set(GLM4_IDS.values()) & set(fixed.values()):
            assigned = dict(GLM4_IDS)
        else:
            free = [i for i in range(256, vocab) if i not in used][:len(rest)]
            if len(free) < len(rest):
                raise ValueError(f"vocab_size={vocab} is too small for the byte tokenizer: it needs 256 byte "
                                 f"ids + {len(rest)} free ids for {rest} besides the config's {len(used)} "
                                 f"special ids, i.e. vocab_size >= {256 + len(rest) + len(used)}")
            assigned = dict(zip(rest, free))
        self.vocab_size = vocab
        self.eos_token_ids = tuple(config.eos_token_ids)
        self.special_ids = {n: fixed[n] if n in fixed else assigned[n] for n in SPECIAL_TOKENS}
        self._id_to_special: dict[int, str] = {}
        for name, i in self.special_ids.items():
            self._id_to_special.setdefault(i, name)  # first name wins: 151329 is <|endoftext|>, not <|pad|>
        self._pattern = _special_pattern(self.special_ids)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for k, piece in enumerate(self._pattern.split(text)):
            if k % 2:  # odd pieces are the captured special tokens
                ids.append(self.special_ids[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """Raw bytes, possibly ending inside a character: what the streaming detokenizer feeds on."""
        ids = list(ids)
        self._check_ids(ids)
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out += self.id_to_token(i).encode("utf-8")
        return bytes(out)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")

    def token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        if len(token) == 1 and 32 <= ord(token) < 127:
            return ord(token)
        m = re.fullmatch(r"<0x([0-9A-F]{2})>|<\|reserved_(\d+)\|>", token)
        if m and m[1]:
            return int(m[1], 16)
        if m and 256 <= int(m[2]) < self.vocab_size and int(m[2]) not in self._id_to_special:
            return int(m[2])
        raise ValueError(f"unknown token {token!r} for the byte tokenizer")

    def id_to_token(self, token_id: int) -> str:
        self._check_ids([token_id])
        if token_id < 256:
            return chr(token_id) if 32 <= token_id < 127 else f"<0x{token_id:02X}>"
        return self._id_to_special.get(token_id, f"<|reserved_{token_id}|>")

    def save(self, directory: str | Path) -> None:
        """A marker only: the ids follow from the model config saved beside it."""
        marker = {"tokenizer_class": BYTE_TOKENIZER_CLASS,
                  "comment": "autoglm-fast's byte tokenizer: ids 0..255 are UTF-8 bytes, special ids from config.json"}
        _write_tokenizer_files(directory, {TOKENIZER_CONFIG: json.dumps(marker, indent=2) + "\n"})


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (a checkpoint's `tokenizer.json`).

    Special ids are looked up by their strings in the file (vocab and added tokens), never assumed;
    all but OPTIONAL_TOKENS must exist. With a config,
    optional audio/pad tokens the file lacks take the config's ids (encoded and decoded here), a
    media/endoftext token whose id differs from the config's is an error, and eos is the config's;
    without one, eos is GLM-4's stop set (<|endoftext|>, <|user|>, <|observation|>). Missing think
    tags are left out of `special_ids`; callers then encode "<think>" as text.
    """

    REQUIRED = tuple(n for n in SPECIAL_TOKENS if n not in OPTIONAL_TOKENS)

    def __init__(self, path: str | Path, config: AutoGLMPhoneConfig | None = None):
        from tokenizers import Tokenizer as _HF  # imported lazily: only checkpoints need it
        file = Path(path) / TOKENIZER_FILE if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        self._tok = _HF.from_file(str(file))
        self._companions = {n: (file.parent / n).read_text() for n in COMPANION_FILES if (file.parent / n).is_file()}
        self._plain = _HF.from_str(self._tok.to_str())  # a twin that treats special strings as text;
        self._plain.encode_special_tokens = True        # separate so encode() never toggles shared state
        found = {n: self._tok.token_to_id(n) for n in SPECIAL_TOKENS}
        missing = [n for n in self.REQUIRED if found[n] is None]
        if missing:
            raise ValueError(f"{file} lacks the special tokens {missing}")
        fixed = config_token_ids(config) if config is not None else {}
        self.special_ids, self._extra = {}, {}  # _extra: config ids the file doesn't know, id -> name
        for name in SPECIAL_TOKENS:
            i, want = found[name], fixed.get(name)
            if i is not None and want is not None and i != want and name != "<|pad|>":
                raise ValueError(f"{file}: {name} is id {i} but the model config says {want}; the tokenizer "
                                 "and config.json must be the same model's")
            if i is None and want is not None:
                holder = self._tok.id_to_token(want)
                if holder is None:
                    self._extra[want] = name
                elif name != "<|pad|>":
                    raise ValueError(f"{file}: config id {want} for {name} is already the token {holder!r}")
                i = want
            if i is not None:
                self.special_ids[name] = i
        self.vocab_size = max([self._tok.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in self._extra])
        self.eos_token_ids = (tuple(config.eos_token_ids) if config is not None else
                              tuple(self.special_ids[n] for n in ("<|endoftext|>", "<|user|>", "<|observation|>")))
        self._pattern = _special_pattern(self._extra.values()) if self._extra else None
        self._think = {self.special_ids[n]: n for n in ("<think>", "</think>") if n in self.special_ids}

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if not allow_special:
            return self._plain.encode(text, add_special_tokens=False).ids
        if self._pattern is None:
            return self._tok.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for k, piece in enumerate(self._pattern.split(text)):
            if k % 2:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids the file doesn't know (the model's padded vocabulary tail) decode to "", as in `tokenizers`.
        skip_special_tokens never drops the think tags, whether or not the file marks them special:
        the server splits reasoning from content on them (vLLM's parsers split on their ids)."""
        out, run = [], []
        for i in ids:  # config-only ids are unknown to the file, kept think tags hidden by it: decode around them
            if i in self._extra or (skip_special_tokens and i in self._think):
                out.append(self._tok.decode(run, skip_special_tokens=skip_special_tokens))
                out.append(self._think[i] if i in self._think else "" if skip_special_tokens else self._extra[i])
                run = []
            else:
                run.append(i)
        out.append(self._tok.decode(run, skip_special_tokens=skip_special_tokens))
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        """tokenizer.json plus the companion files it was loaded with (else a minimal tokenizer_config.json)."""
        files = {TOKENIZER_FILE: self._tok.to_str(pretty=True), **self._companions}
        if TOKENIZER_CONFIG not in files:
            pad = "<|pad|>" if self._tok.token_to_id("<|pad|>") is not None else "<|endoftext|>"
            files[TOKENIZER_CONFIG] = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                  "eos_token": "<|endoftext|>", "pad_token": pad}, indent=2) + "\n"
        _write_tokenizer_files(directory, files)

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            i = self.special_ids.get(token)
        if i is None:
            raise ValueError(f"unknown token {token!r} for tokenizer")
        return i

    def id_to_token(self, token_id: int) -> str:
        token = self._extra.get(token_id) or self._tok.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the tokenizer")
        return token


def find_tokenizer(model_dir: str | Path | None, tokenizer: str | Path | None = None) -> str | Path:
    """Where the tokenizer comes from: BYTES or a tokenizer.json path. `tokenizer` (BYTES, a
    tokenizer.json, or a directory holding one or our byte marker) wins over `model_dir`'s own files.
    Cheap (no parsing), so callers check it before loading weights."""
    if tokenizer is not None and str(tokenizer) == BYTES:
        return BYTES
    where = tokenizer if tokenizer is not None else model_dir
    if where is None:
        raise TokenizerNotFoundError(f"no checkpoint directory and no tokenizer: pass tokenizer='{BYTES}' or a path")
    where = Path(where)
    if where.is_file():
        return where
    if (where / TOKENIZER_FILE).is_file():
        return where / TOKENIZER_FILE
    if _byte_marker(where / TOKENIZER_CONFIG):
        return BYTES
    what = f"no {TOKENIZER_FILE}" if where.is_dir() else "no such tokenizer file or directory"
    raise TokenizerNotFoundError(
        f"{where}: {what}. Put the model's {TOKENIZER_FILE} (with its {TOKENIZER_CONFIG}) there, or pass "
        f"--tokenizer PATH (tokenizer='PATH'; a {TOKENIZER_FILE} or a directory holding one), or "
        f"--tokenizer {BYTES} (tokenizer='{BYTES}') for the built-in byte tokenizer, which is not a real "
        f"model's vocabulary")


def _byte_marker(file: Path) -> bool:
    try:
        return json.loads(file.read_text()).get("tokenizer_class") == BYTE_TOKENIZER_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def load_tokenizer(model_dir: str | Path | None, config: AutoGLMPhoneConfig,
                   tokenizer: str | Path | Tokenizer | None = None) -> Tokenizer:
    """The tokenizer `find_tokenizer` names, checked against `config`; a `Tokenizer` passes through."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    source = find_tokenizer(model_dir, tokenizer)
    return ByteTokenizer(config) if source == BYTES else HFTokenizer(source, config)


class IncrementalDetokenizer:
    """Turns a token stream into text deltas that never end inside a UTF-8 character.

    Byte tokenizer: an incremental UTF-8 decoder holds back incomplete byte sequences (O(1) per token).
    Other tokenizers: the vLLM/TGI offsets technique. Keep the ids of the last emitted delta as context
    plus the ids not yet emitted; decode context+pending and context alone, and emit the difference
    unless it ends in U+FFFD (a character still being built). Decoding with context makes decoders
    that treat a first token specially (leading spaces) agree with a whole decode.
    Concatenated deltas + flush() == tokenizer.decode(all ids, skip_special_tokens).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        is_bytes = isinstance(tokenizer, ByteTokenizer)
        self._decode_bytes = tokenizer.decode_bytes if is_bytes else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if is_bytes else None
        self._ids: list[int] = []  # context ids, then pending ids
        self._context = 0          # how many of _ids are context

    def push(self, token_id: int) -> str:
        if self._decode_bytes is not None:
            return self._utf8.decode(self._decode_bytes([token_id], self.skip_special_tokens))
        self._ids.append(token_id)
        context, text = self._decode()
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._context:]  # what was pending becomes the next context
        self._context = len(self._ids)
        return text[len(context):]

    def flush(self) -> str:
        """Whatever is held back at the end of the stream; invalid trailing bytes become U+FFFD."""
        if self._decode_bytes is not None:
            return self._utf8.decode(b"", final=True)
        context, text = self._decode()
        self._ids, self._context = [], 0
        return text[len(context):]

    def _decode(self) -> tuple[str, str]:
        dec, skip = self.tokenizer.decode, self.skip_special_tokens
        return dec(self._ids[:self._context], skip), dec(self._ids, skip)
