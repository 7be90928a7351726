"""The ``ehi`` command line: ``main`` parses and runs one command (``ehi = ehi.cli:main``)."""

from ehi.cli.entry import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
