"""Argument types and shared help texts of the command line: each type checks one value and
says what is wrong with it in argparse's own error line."""

from __future__ import annotations

import argparse
import re

from ehi.config import BACKENDS, ROUTERS  # noqa: E402
from ehi.limits import MAX_K  # noqa: E402


def budget_arg(text: str) -> float:
    try:
        v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1] (or 0-100%), got {text!r}")
    return v


def device_arg(text: str) -> str:
    """cpu, cuda or cuda:N, and a GPU only where torch sees one: checked before any work."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N")
    if text.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        idx = int(text.split(":")[1]) if ":" in text else 0
        if idx >= n:
            raise argparse.ArgumentTypeError(f"{text}: no such GPU here (torch sees {n})")
    return text


def int_in(text: str, lo: int, hi: int | None = None) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {v}" if hi is not None else f"must be >= {lo}, got {v}")
    return v


def float_in(text: str, ok, bounds: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text!r}")
    return v


def ms_arg(text: str) -> float:
    return float_in(text, lambda v: 0 <= v <= 1000, "0..1000 ms")


def seconds_arg(text: str) -> float:
    return float_in(text, lambda v: 0 < v <= 3600, "(0, 3600] seconds")


def port_arg(text: str) -> int:
    return int_in(text, 0, 65535)


def positive_arg(text: str) -> int:
    return int_in(text, 1)


def k_arg(text: str) -> int:
    return int_in(text, 1, MAX_K)


def nonneg_arg(text: str) -> int:
    return int_in(text, 0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, unless the help already says it or there is none
    to say (None / False: the config's value, or off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


BACKEND_HELP = ("what runs the frozen transformer: auto (ONNX Runtime where it can: the adapter scope on the CPU; else torch), "
                "torch, onnx (same embeddings, faster) or onnx-int8 (quantized: faster, a little less exact)")
def backend_override(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder-backend", choices=BACKENDS, help=BACKEND_HELP + " (default: the model's)")


REPARTITION_HELP = ("then re-draw the leaves as k-means over every document (replaces the learned partition): for documents "
                    "unlike the trained ones, e.g. a new topic, which the trained leaves have no room for")
ROUTER_HELP = ("how a search picks its leaves: spread (each leaf's mean and spread of its documents' inner products with the "
               "query; routes questions about documents no training query touched) or tree (the learned tree; cheaper per query)")


def router_option(p: argparse.ArgumentParser, saved: bool) -> None:
    p.add_argument("--router", choices=ROUTERS, help=ROUTER_HELP + (" (saved in the model; default spread)" if saved else " (default: the model's)"))


class Parser(argparse.ArgumentParser):
    """Every parser, subcommands' included (argparse makes them of their parent's class),
    shows option defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


LOCAL_RAY = "local"  # --ray without an address: a Ray started on this machine
NO_PROGRESS = "no progress bars, even on a terminal (a line per phase still says what runs; bars are drawn only on a terminal anyway)"
