"""argparse `type=` converters shared by the `fusionnet` subcommands (their messages name the bound)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An int >= `low`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse says "invalid integer value: 'x'" for a non-number
    return parse


def positive_number(noun: str = "finite number") -> Callable[[str], float]:
    """A finite float > 0; `noun` names it in the error ("must be a <noun> > 0")."""

    def parse(text: str) -> float:
        value = float(text)
        if not (0.0 < value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be a {noun} > 0, got {text}")
        return value

    parse.__name__ = "number"
    return parse
