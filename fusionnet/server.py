"""`fusionnet serve`: an HTTP server for a matting model (placeholder, being written)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's options."""


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("fusionnet serve")
