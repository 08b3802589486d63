"""Argument types shared by the commands: each refuses a bad value with the command's own sentence,
which argparse prints after the option's name."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least_one(refusal: Callable[[str], str]) -> Callable[[str], int]:
    """A whole number of at least 1; anything else is refused with `refusal(text)`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(refusal(text))
        return value
    return parse
