"""Token ids -> streamed text deltas, with stop sequences.

Incremental detokenization decodes only a short window per token (the prefix/read-offset scheme of
text-generation-inference), so the cost per token does not grow with the completion's length. Text that
could be the start of a stop sequence is held back until it is known not to be one; hence the streamed
deltas always concatenate to exactly the final text.
"""

from __future__ import annotations


class TextStream:
    """One completion's text: ``push(token) -> (delta, stopped)``, then ``flush()`` at the end."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens before this index have been emitted as text
        self.pending = ""  # held back: might be the start of a stop sequence
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _detok(self) -> str:
        before = self._decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # not in the middle of a UTF-8 char
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def _filter(self, text: str) -> str:
        """Emit what can no longer be part of a stop sequence; set ``stopped`` when one is complete."""
        if not self.stop:
            return text
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.pending, self.stopped = "", True
            return buf[:cut]
        hold = 0
        for k in range(min(len(buf), self.max_stop - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop):
                hold = k
                break
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a generated token; returns the text to stream now and whether a stop sequence completed."""
        self.ids.append(token_id)
        return self._filter(self._detok()), self.stopped

    def flush(self) -> str:
        """The rest of the text at the end of the completion (an unfinished character included)."""
        if self.stopped:
            return ""
        before = self._decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        tail = self._decode(self.ids[self.prefix :])[len(before) :]
        self.prefix = self.read = len(self.ids)
        out = self._filter(tail)
        if not self.stopped:
            out, self.pending = out + self.pending, ""
        return out
