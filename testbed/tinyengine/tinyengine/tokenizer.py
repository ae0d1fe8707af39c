"""GPT-2 style byte-level BPE tokenizer built from GGUF metadata.

Pre-tokenization follows SmolLM2's tokenizer (llama.cpp pre-tokenizer
``smollm``; HF: ``Sequence[Digits(individual_digits=True), ByteLevel]``):

1. control tokens (token type 3, e.g. ``<|im_start|>``) are split out first
   when ``allow_special`` is true;
2. every digit becomes its own piece (``\\p{N}``);
3. each remaining piece is split with the GPT-2 regex
   ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``
   (the ``regex`` module provides ``\\p{..}``);
4. each piece is mapped byte-wise to GPT-2's printable unicode alphabet and
   merged with the BPE merge ranks.

This matches the HF tokenizer on ordinary text; exotic Unicode corner cases
(e.g. normalisation, which SmolLM2 does not use) are not specially handled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGIT_PATTERN = r"\p{N}"
TOKEN_TYPE_CONTROL = 3
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class Tokenizer:
    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None = None,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.merge_ranks: dict[tuple[str, str], int] = {}
        for rank, m in enumerate(merges):
            a, b = m.split(" ", 1)
            self.merge_ranks[(a, b)] = rank
        types = list(token_types) if token_types is not None else [1] * len(self.tokens)
        self.special_ids = {i for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL}
        self.special_tokens = {self.tokens[i]: i for i in sorted(self.special_ids)}
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self._byte_enc = bytes_to_unicode()
        self._byte_dec = {c: b for b, c in self._byte_enc.items()}
        self._pat = regex.compile(GPT2_PATTERN)
        self._digits = regex.compile(DIGIT_PATTERN)
        specials = sorted(self.special_tokens, key=len, reverse=True)
        self._special_pat = (
            regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")") if specials else None
        )
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"unsupported tokenizer model {model!r} (only gpt2 byte-level BPE)")
        return cls(
            meta["tokenizer.ggml.tokens"],
            meta["tokenizer.ggml.merges"],
            meta.get("tokenizer.ggml.token_type"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # ---- encoding -----------------------------------------------------------------

    def _bpe(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word)
        ranks = self.merge_ranks
        while len(parts) > 1:
            best = None
            best_rank = None
            for i in range(len(parts) - 1):
                r = ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            # merge every occurrence of the best pair, left to right
            a, b = parts[best], parts[best + 1]
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = []
        for p in parts:
            tid = self.vocab.get(p)
            if tid is None:
                # cannot happen with a complete byte-level vocab; fall back to unk
                if self.unk_token_id is None:
                    raise KeyError(f"token {p!r} not in vocabulary")
                tid = self.unk_token_id
            ids.append(tid)
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        enc = self._byte_enc
        pos = 0
        pieces: list[str] = []
        for m in self._digits.finditer(text):
            if m.start() > pos:
                pieces.append(text[pos : m.start()])
            pieces.append(m.group())
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        for piece in pieces:
            for word in self._pat.findall(piece):
                out.extend(self._bpe("".join(enc[b] for b in word.encode("utf-8"))))

    def encode(self, text: str, *, allow_special: bool = True, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``. With ``allow_special``, control-token strings
        such as ``<|im_start|>`` become their single ids; otherwise they are
        tokenized as plain text."""
        out: list[int] = []
        if add_bos and self.bos_token_id is not None:
            out.append(self.bos_token_id)
        if allow_special and self._special_pat is not None:
            for i, part in enumerate(self._special_pat.split(text)):
                if i % 2 == 1:
                    out.append(self.special_tokens[part])
                elif part:
                    self._encode_ordinary(part, out)
        else:
            self._encode_ordinary(text, out)
        return out

    # ---- decoding -----------------------------------------------------------------

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        buf = bytearray()
        dec = self._byte_dec
        for i in ids:
            i = int(i)
            if i in self.special_ids:
                if not skip_special:
                    buf.extend(self.tokens[i].encode("utf-8"))
                continue
            for ch in self.tokens[i]:
                b = dec.get(ch)
                if b is None:
                    buf.extend(ch.encode("utf-8"))
                else:
                    buf.append(b)
        return buf.decode("utf-8", errors="replace")

    # ---- chat ---------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """SmolLM2's ChatML template (the GGUF's ``tokenizer.chat_template``,
        rendered by hand): a default system message is prepended when the
        first message is not a system message."""
        parts = []
        if messages and messages[0]["role"] != "system":
            parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        for m in messages:
            parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def chat(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the chat prompt (see :meth:`apply_chat_template`)."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
            allow_special=True,
        )
