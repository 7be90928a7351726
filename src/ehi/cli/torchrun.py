"""Distributed training entry point: ``torchrun --nproc_per_node N -m ehi.cli.torchrun ARGS``.

ARGS are those of ``ehi train``. Each process joins the torchrun group (gloo on CPU, nccl
when ``--device cuda``), encoding, refreshing and batches are split over the ranks, the
gradients are averaged by DistributedDataParallel, and only rank 0 writes artifacts.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    from ehi.cli.entry import build_parser, run

    # parsed, not patched: --device cuda and --device=cuda are the same argument
    args = build_parser().parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    gpu = (args.device or "").startswith("cuda") and torch.cuda.is_available()
    if "RANK" in os.environ and not dist.is_initialized():
        if gpu:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group(backend="nccl" if gpu else "gloo")
    try:
        return run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
