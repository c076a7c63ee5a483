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
"""

from __future__ import annotations

from typing import Any


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
