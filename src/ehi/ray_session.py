"""Ray, for the parts of ehi that run beyond one process: the connection every one of them
shares, and the figures its workers report. Ray is an extra (``pip install 'ehi[ray]'``);
nothing imports this module at the top of a core path."""

from __future__ import annotations

import logging
import os

RAY_EXTRA = "pip install 'ehi[ray]'"

def ray_module():
    try:
        import ray
    except ImportError:
        raise ValueError(f"needs the 'ray' extra (ray not installed): {RAY_EXTRA}") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Ray, initialised once: the cluster at ``address``, else a local one (``num_cpus``)."""
    ray = ray_module()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        try:
            # errors only: its notices (token authentication, progress bars off) are not ours
            ray.init(**kwargs, include_dashboard=False, log_to_driver=os.environ.get("EHI_RAY_LOGS") == "1", logging_level=logging.ERROR, configure_logging=True)
        except ConnectionError as e:
            raise ValueError(f"cannot reach the Ray cluster at {address}: {e}") from None
        logging.getLogger("ray").setLevel(logging.ERROR)
    return ray


def quiet_data(ray) -> None:
    import warnings

    with warnings.catch_warnings():  # Ray's own context warns of its deprecated fields
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.ERROR)


def proc_bytes(field: str) -> int:
    """A memory figure of this process from /proc (VmRSS: resident now; VmHWM: its peak); 0
    where there is no /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
