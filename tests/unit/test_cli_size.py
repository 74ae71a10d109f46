import argparse

import pytest

from blockmig.cli import parse_size


@pytest.mark.parametrize("text,expected", [("64M", 64 << 20), ("16MiB", 16 << 20), ("1g", 1 << 30), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12X", "-1M"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)
