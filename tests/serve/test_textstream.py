"""Stop-string matching on streamed text and incremental detokenization."""

from __future__ import annotations

import pytest

from lmforge.serve.textstream import IncrementalDetokenizer, StopStringMatcher


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, bool]:
    emitted = []
    for delta in deltas:
        text, matched = matcher.feed(delta)
        emitted.append(text)
        if matched:
            return "".join(emitted), True
    emitted.append(matcher.flush())
    return "".join(emitted), False


@pytest.mark.parametrize(
    ("stops", "deltas", "expected", "matched"),
    [
        (["END"], ["The E", "N", "D!"], "The ", True),
        (["END"], ["The E", "N", "d!"], "The ENd!", False),
        (["\n\n"], ["a\n", "\nb"], "a", True),
        (["xyz", "b"], ["aaxy", "zb"], "aa", True),
        (["b", "xyz"], ["axyb"], "axy", True),
        (["<|im_end|>"], ["Hi<|im", "_end", "|>more"], "Hi", True),
        (["ab"], ["a", "a", "a"], "aaa", False),
        ([], ["a", "b"], "ab", False),
    ],
)
def test_matcher_table(stops, deltas, expected, matched):
    text, was_matched = feed_all(StopStringMatcher(stops), deltas)

    assert text == expected
    assert was_matched is matched


def test_matcher_holds_back_possible_start():
    matcher = StopStringMatcher(["STOP"])

    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("Px") == ("", True)


def test_detokenizer_matches_full_decode(tiny_model):
    _, tokenizer = tiny_model
    text = "Lena has 24 apples. Ünïcödé → ✓ done\n"
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)

    deltas = [detokenizer.add(token_id) for token_id in token_ids]
    deltas.append(detokenizer.flush())

    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_detokenizer_skips_special_tokens(tiny_model):
    _, tokenizer = tiny_model
    token_ids = tokenizer("<|im_start|>assistant\nHi", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)

    text = "".join(detokenizer.add(token_id) for token_id in token_ids) + detokenizer.flush()

    assert text == "assistant\nHi"
