"""Incremental detokenization and stop-string handling for one sequence."""

from __future__ import annotations

from typing import Any

# Tokens of prompt context decoded with the output, so that tokenizers which drop a leading
# space on the first decoded token (SentencePiece) still produce the right first delta.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: tuple[int, ...], skip_special_tokens: bool,
                 stop: tuple[str, ...], include_stop: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.released = 0  # characters of text already handed to the client
        self.stop = stop
        self.include_stop = include_stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completed (empty while a UTF-8 char is partial)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def find_stop(self, delta_len: int) -> str | None:
        """Truncate at the first stop string that the last delta completed; return it."""
        if not self.stop:
            return None
        search_from = max(0, len(self.text) - delta_len - self.hold_back)
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.text = self.text[: at + len(s) if self.include_stop else at]
        return s

    def release(self, finished: bool) -> str:
        """Text safe to send now: all of it when finished, else all but a possible stop prefix."""
        end = len(self.text) if finished else max(self.released, len(self.text) - self.hold_back)
        out = self.text[self.released : end]
        self.released = end
        return out
