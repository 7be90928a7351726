"""Command line: ``ehi train | tune | evaluate | search | index | serve | benchmark | cache``, mirroring the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



from ehi.cli.commands import (
    cmd_benchmark,
    cmd_cache,
    cmd_evaluate,
    cmd_index,
    cmd_search,
    cmd_serve,
    cmd_train,
    cmd_tune,
)
from ehi.cli.parser import _config_from_args, build_parser  # noqa: F401  (_config_from_args: tests build configs through it)

COMMANDS = {"cache": cmd_cache, "serve": cmd_serve, "tune": cmd_tune, "train": cmd_train, "index": cmd_index, "search": cmd_search, "evaluate": cmd_evaluate, "benchmark": cmd_benchmark}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "search" and not any(x.startswith("-") and len(x) > 1 for x in extra):
        # words after an option ('ehi search M --budget 5% protein folding') are the query's too
        args.query = [*args.query, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run parsed arguments: exit code 2 with one line for bad input, 0 otherwise."""
    from ehi.artifacts import ArtifactError
    from ehi.data import DataError

    for stream in (sys.stdout, sys.stderr):  # a redirected log shows each line as it happens
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    quiet = getattr(args, "no_progress", False)
    before = os.environ.get("EHI_NO_PROGRESS")
    if quiet:  # inner bars too (encoding, embedding), for this command only
        os.environ["EHI_NO_PROGRESS"] = "1"
    try:
        COMMANDS[args.command](args)
    except (DataError, ArtifactError, ValueError) as e:
        print(f"ehi {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if quiet:
            if before is None:
                os.environ.pop("EHI_NO_PROGRESS", None)
            else:
                os.environ["EHI_NO_PROGRESS"] = before
    return 0


if __name__ == "__main__":
    sys.exit(main())
