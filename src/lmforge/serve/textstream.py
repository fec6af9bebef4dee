"""Turn generated token ids into text deltas, holding back possible stop-string starts.

Two problems make "decode each token and print it" wrong:

- One character can span several tokens (byte-level BPE splits UTF-8 bytes), and
  SentencePiece tokenizers drop a word's leading space when a token is decoded
  alone. `IncrementalDetokenizer` decodes a sliding window of tokens and emits the
  text that the newest token added, once that text no longer ends in a partial
  character.
- A stop string can span token boundaries ("</s" + "top>"). `StopStringMatcher`
  matches on the decoded text and holds back any tail that could still grow into
  a stop string, so a client never receives text that later turns out to be part
  of the stop sequence. Streaming and non-streaming responses come from the same
  deltas, so they stop at the same place.

Example with the stop string "END" and the deltas "The E", "N", "D!":
`feed("The E")` returns ("The ", False) and keeps "E" pending. `feed("N")` returns
("", False) with "EN" pending, and `feed("D!")` returns ("", True). The content is "The ".
"""

from __future__ import annotations

from typing import Sequence

# U+FFFD is what tokenizers decode an incomplete UTF-8 byte sequence to.
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decoder from a growing list of token ids to text deltas, skipping special tokens.

    The decoded window starts one emitted token before the new ones, so spacing that
    depends on the previous token (SentencePiece's leading "▁") comes out right.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append `token_id` and return the text it completes ("" while a character is incomplete)."""
        self._token_ids.append(token_id)
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return window_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return the text not yet emitted, including a trailing incomplete character."""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        if len(window_text) <= len(prefix_text):
            return ""
        return window_text[len(prefix_text) :]


class StopStringMatcher:
    """Matcher of stop strings on streamed text that releases only text that cannot start a match.

    `feed(delta)` returns `(text_to_emit, matched)`. Once `matched` is True the text
    before the earliest stop string has been returned and the rest must be dropped.
    """

    def __init__(self, stop_strings: Sequence[str]):
        self._stop_strings = [stop for stop in stop_strings if stop]
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self._stop_strings:
            return delta, False

        self._pending += delta
        match_start = -1
        for stop in self._stop_strings:
            index = self._pending.find(stop)
            if index != -1 and (match_start == -1 or index < match_start):
                match_start = index
        if match_start != -1:
            text = self._pending[:match_start]
            self._pending = ""
            return text, True

        held_length = self._longest_stop_prefix_suffix()
        release_end = len(self._pending) - held_length
        text = self._pending[:release_end]
        self._pending = self._pending[release_end:]
        return text, False

    def flush(self) -> str:
        """Return the held-back text, used when generation ends without a match."""
        text = self._pending
        self._pending = ""
        return text

    def _longest_stop_prefix_suffix(self) -> int:
        """Return the length of the longest suffix of the pending text that starts some stop string."""
        longest = 0
        for stop in self._stop_strings:
            max_length = min(len(stop) - 1, len(self._pending))
            for length in range(max_length, longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest
