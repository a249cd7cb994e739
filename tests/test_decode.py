"""The token loop's pure helpers: never show half a character or the start of a stop sequence."""

from __future__ import annotations

import pytest

from backends.llamacpp_decode import complete_utf8_prefix, held_back_for_stop


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"abc", 3),
        ("é".encode(), 2),
        ("é".encode()[:1], 0),
        (b"ab" + "€".encode()[:2], 2),
        (b"ab" + "€".encode(), 5),
        (b"x" + "😀".encode()[:3], 1),
        (b"x" + "😀".encode(), 5),
    ],
)
def test_complete_utf8_prefix(data: bytes, expected: int) -> None:
    assert complete_utf8_prefix(data) == expected


@pytest.mark.parametrize(
    ("data", "stops", "expected"),
    [
        (b"Hello wor", (b"world!",), 3),
        (b"Hello", (b"\n\nUser:",), 0),
        (b"Hello\n", (b"\n\nUser:",), 1),
        (b"Hello\n\nUs", (b"\n\nUser:", b"Us"), 4),
        (b"abc", (), 0),
    ],
)
def test_held_back_for_stop(data: bytes, stops: tuple[bytes, ...], expected: int) -> None:
    assert held_back_for_stop(data, stops) == expected
