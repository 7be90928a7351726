"""Distributed training entry point: ``torchrun --nproc_per_node N -m ehi.train ARGS``.

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
    argv = list(sys.argv[1:] if argv is None else argv)
    gpu = any(a.startswith("cuda") for a in argv) and torch.cuda.is_available()
    if "RANK" in os.environ and not dist.is_initialized():
        if gpu:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            if "--device" in argv:
                argv[argv.index("--device") + 1] = f"cuda:{local}"
        dist.init_process_group(backend="nccl" if gpu else "gloo")
    from .cli import main as cli_main

    try:
        return cli_main(["train", *argv])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
