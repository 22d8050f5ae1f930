from __future__ import annotations

import pytest

from vismmoe.config import format_size, parse_size
from vismmoe.errors import UserError


@pytest.mark.parametrize("text,total,want", [
    ("512MiB", None, 512 * 1024**2), ("2GiB", None, 2 * 1024**3), ("1.5GB", None, 1_500_000_000),
    ("1000", None, 1000), ("25%", 1000, 250), ("100%", 77, 77), (" 3 kib ", None, 3072),
])
def test_parse_size(text, total, want):
    assert parse_size(text, total=total) == want


@pytest.mark.parametrize("text,total", [("lots", None), ("12XB", None), ("25%", None), ("0%", 10), ("150%", 10),
                                        ("-5MiB", None)])
def test_parse_size_rejects(text, total):
    with pytest.raises(UserError):
        parse_size(text, total=total)


def test_format_size():
    assert format_size(3 * 1024**2) == "3.00MiB" and format_size(10) == "10B"
