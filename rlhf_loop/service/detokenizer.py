"""Token ids -> text deltas for one choice, incrementally, with stop strings cut out and never leaked.

    detok = Detokenizer(tokenizer, stop=("\\n\\n",))
    text, stopped = detok.push(token_id)     # per sampled token
    text = detok.flush()                     # at the end of an answer that no stop string ended

Each token decodes only a short window of ids (vLLM's and TGI's `prefix_offset` /
`read_offset` scheme), not the whole answer: the window starts a few tokens back so that
tokenizers whose decoding depends on the previous token (SentencePiece's leading space)
decode the same as a full decode would, and it moves on once its text is complete. A
window whose text ends in U+FFFD is an incomplete character (byte-level BPE splits
multi-byte characters across tokens): the text before it is shown, the rest waits for
the next token.

A stop string can only start in text not yet handed out: text that could still become
the start of a stop string is held back until it cannot, so the search per token covers
only that tail.

`TokenBytes` gives a single token's own bytes, for OpenAI's `logprobs` (`token`, `bytes`):

    TokenBytes(tokenizer)(token_id) -> b" hello"

A byte-level BPE (GPT-2's alphabet: Llama 3, Qwen, SmolLM, the embedded model) spells every
byte with one character, so a token's vocabulary string is its exact bytes, a part of a
multi-byte character included: the bytes of an answer's tokens joined are its UTF-8 text.
A SentencePiece byte-fallback token `<0xE2>` is that byte, and `▁` is a space; an added
(special) token is its text. The token's text is those bytes decoded, U+FFFD for a part of
a character: a client that needs the characters joins the bytes, as OpenAI's docs say.
"""

from __future__ import annotations

import re
from typing import Any

from tokenizers import decoders


class Detokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is the context the next window is decoded against
        self.read = 0  # ids[read:] are not in `text` yet
        self.text = ""  # the text of ids[:read]
        self.pending = ""  # the text of ids[read:] up to an incomplete character at its end
        self.emitted = 0  # characters of text + pending already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new text to show, whether a stop string ended the answer)."""
        self.ids.append(token_id)
        context = self._decode(self.ids[self.prefix:self.read])
        new = self._decode(self.ids[self.prefix:])[len(context):]
        if new and not new.endswith("\ufffd"):
            self.text += new
            self.prefix, self.read, self.pending = self.read, len(self.ids), ""
        else:
            # U+FFFD at the end: a character still incomplete (it decodes to exactly one U+FFFD), or
            # bytes that never make one (a random model's output); everything before it is final
            self.pending = new[:-1]
        return self._release()

    def flush(self) -> str:
        """Whatever was held back (an unfinished stop-string prefix, an incomplete character)."""
        context = self._decode(self.ids[self.prefix:self.read])
        self.text += self._decode(self.ids[self.prefix:])[len(context):]
        self.prefix, self.read, self.pending = len(self.ids), len(self.ids), ""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    def _release(self) -> tuple[str, bool]:
        text = self.text + self.pending
        hits = [i for i in (text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            delta = text[self.emitted:end]
            self.emitted = end
            return delta, True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        end = max(self.emitted, len(text) - hold)
        delta = text[self.emitted:end]
        self.emitted = end
        return delta, False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class TokenBytes:
    """Token id -> its own bytes (module docstring), cached per id: one per loaded tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.added = {i: t.content.encode() for i, t in tokenizer.added_tokens_decoder.items()}
        self.byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
        self.cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        out = self.cache.get(token_id)
        if out is None:
            out = self.cache[token_id] = self._bytes(token_id)
        return out

    def text(self, token_id: int) -> str:
        return self(token_id).decode("utf-8", errors="replace")

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id]
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.byte_level:
            return bytes(_BYTE_OF[c] for c in piece)
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m[1], 16)])
        return piece.replace("\u2581", " ").encode()


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes are themselves, the rest are
    shifted to 256 + n (the `bytes_to_unicode` table every byte-level BPE uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_OF = _byte_alphabet()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
