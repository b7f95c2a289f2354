"""Token ids -> text, a few tokens at a time, with stop strings.

Two things make streaming text harder than `decode(all_ids)`:
- A character can span tokens (byte-level BPE splits an emoji into up to four byte tokens). Decoding a
  prefix then ends in U+FFFD; we hold such text back until the character completes.
- A stop string can span tokens ("###" as "#" + "##"). Text that could still become a stop string is held
  back until the next tokens decide it.

Cost per call is O(new tokens): like vLLM we decode only a short window of recent ids. `prefix_offset` ..
`read_offset` is the window already turned into text; decoding `ids[prefix_offset:]` and cutting off the
window's own text leaves the new text. Decoding with a little context in front (rather than the new ids
alone) keeps sentencepiece's "strip the leading space of the first word" from eating real spaces.
"""

from __future__ import annotations

from tokenmill.tokenizer.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first generated one, for context (see module docstring).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._include_stop = include_stop_str_in_output
        self._stops = [s for s in (stop or []) if s]
        # Longest stop string bounds how much text we ever hold back for stop matching.
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(0, self._read_offset)  # decode of ids[prefix_offset:read_offset]
        self._pending = ""  # decoded text held back because it may begin a stop string
        self._chunks: list[str] = []  # emitted text; joined on demand so a long stream never copies per token
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_ids: list[int]) -> str:
        """Feed newly generated token ids; return the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        out = []
        for token_id in token_ids:
            self._ids.append(token_id)
            delta = self._decode_new()
            if not delta:
                continue
            released = self._release(delta)
            out.append(released)
            if self.stopped:
                break
        emitted = "".join(out)
        if emitted:
            self._chunks.append(emitted)
        return emitted

    def flush(self) -> str:
        """End of generation without a stop string: release whatever is still held back."""
        if self.stopped:
            return ""
        tail = self._decode(self._prefix_offset, len(self._ids))[len(self._prefix_text):]  # may end in U+FFFD
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        # The tail can still complete a stop string; whatever is held back after that is final.
        emitted = self._release(tail) if tail else ""
        if not self.stopped:
            emitted += self._pending
            self._pending = ""
        if emitted:
            self._chunks.append(emitted)
        return emitted

    # ------------------------------------------------------------------------------------------ internals

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _decode_new(self) -> str:
        """Text the ids past read_offset add, or '' while it ends in an unfinished character."""
        prefix_text = self._prefix_text
        full_text = self._decode(self._prefix_offset, len(self._ids))
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            # Nothing visible yet (a special token skipped) or a character split across tokens: wait.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return full_text[len(prefix_text):]

    def _release(self, delta: str) -> str:
        """Apply stop strings to the held-back text plus `delta`; return what may be emitted now."""
        if not self._stops:
            return delta
        buf = self._pending + delta
        # The stop string that is complete first wins (earliest end; on a tie, the longer one). This is what
        # character-by-character streaming would find, so the result does not depend on how the text was
        # cut into tokens. Each string's earliest occurrence is also its earliest end.
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            pos = buf.find(s)
            if pos >= 0 and (best is None or (pos + len(s), pos) < best[:2]):
                best = (pos + len(s), pos, s)
        if best is not None:
            _, pos, s = best
            self.stopped = True
            self.stop_reason = s
            self._pending = ""
            return buf[: pos + len(s)] if self._include_stop else buf[:pos]
        # Hold back the longest tail of buf that is the start of some stop string.
        hold = 0
        for k in range(min(len(buf), self._max_stop_len - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                hold = k
                break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]
