import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from ehi.model.ehi_model import EHIModel
from ehi.training.trainer import checkpoint_path

ARGS = ["--epochs", "30", "--batch-size", "2", "--refresh-every", "3", "--seed", "7", "--no-progress"]


def train_cmd(data, out, *extra, shape=("4", "1")):
    """``ehi train`` of a (B, H) tree, ``shape`` = (B, H)."""
    return [sys.executable, "-m", "ehi.cli", "train", "--data", str(data), "--out", str(out), "-B", shape[0], "-H", shape[1], *ARGS, *extra]


def checkpoint_epoch(out):
    try:
        return json.loads((checkpoint_path(out) / "manifest.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


# Trains as `ehi train ARGS` would, and after the checkpoint of epoch 4 says so and blocks:
# the test kills it there, whatever the machine's speed (no polling, no timing).
DRIVER = """
import sys
from ehi.cli.entry import _config_from_args, build_parser
from ehi.data import load_beir
from ehi.training.trainer import Trainer

args = build_parser().parse_args(sys.argv[1:])
def pause(trainer, record):
    if record["epoch"] == 4 and "stage" not in record:
        print("checkpointed", flush=True)
        sys.stdin.read()
Trainer(_config_from_args(args), load_beir(args.data)).fit(args.out, progress=False, on_epoch=pause)
"""


@pytest.mark.slow
@pytest.mark.parametrize("shape", [("4", "1"), ("3", "2"), ("2", "3")], ids=["H1", "H2", "H3"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_beir, tmp_path, shape):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref = tmp_path / "ref"
    subprocess.run(train_cmd(tiny_beir, ref, shape=shape), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    args = train_cmd(tiny_beir, out, shape=shape)[train_cmd(tiny_beir, out).index("train") :]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_epoch(out)
    assert killed_at == 4 and not out.exists()

    done = subprocess.run(train_cmd(tiny_beir, out, "--resume", shape=shape), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming after epoch {killed_at} of 30" in done.stdout

    assert not checkpoint_path(out).exists()  # removed once the model is saved
    a, b = EHIModel.load(ref), EHIModel.load(out)
    # bit-identical on CPU: same weights, same leaves, same results
    for (k, v), (_, w) in zip(a.tree.state_dict().items(), b.tree.state_dict().items()):
        assert np.array_equal(v.numpy(), w.numpy()), k
    assert np.array_equal(a.encoder.adapter.weight.detach().numpy(), b.encoder.adapter.weight.detach().numpy())
    assert np.array_equal(a.index.doc_leaves, b.index.doc_leaves)
    ra, rb = a.search(["guitar chord music", "oven flour"], k=5, beam=2), b.search(["guitar chord music", "oven flour"], k=5, beam=2)
    assert [[h.doc_id for h in r.hits] for r in ra] == [[h.doc_id for h in r.hits] for r in rb]


@pytest.mark.slow
def test_resume_refuses_a_different_config(tiny_beir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "m"
    subprocess.run(train_cmd(tiny_beir, out, "--keep-checkpoint"), check=True, env=env, capture_output=True)
    cmd = train_cmd(tiny_beir, out, "--resume", "--overwrite")  # the finished run's model is at out
    cmd[cmd.index("7")] = "8"  # another seed
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "different configuration" in done.stderr


def test_a_checkpoint_restores_the_whole_training_state(tiny_beir, tmp_path):
    """What ``resume`` restores equals, field by field, the state the run had when it wrote the
    checkpoint: epoch, stage, history, validation, the kept best state, negatives, routing
    targets and the batch-order generator (a two-level tree, neighbour targets on)."""
    import copy
    import shutil

    from conftest import tiny_config

    from ehi.data import load_beir
    from ehi.training.trainer import Trainer

    cfg = tiny_config(branching=3, epochs=4, hard_negatives=2, lambda_neighbours=0.5)
    cfg.tree.height = 2
    ds = load_beir(tiny_beir)
    out, kept = tmp_path / "m", tmp_path / "kept"
    seen = {}

    def keep(trainer, record):
        if record["epoch"] == 3 and "stage" not in record:
            shutil.copytree(checkpoint_path(out), kept)
            seen["state"] = copy.deepcopy(trainer.state)

    Trainer(cfg, ds).fit(out, progress=False, on_epoch=keep, build_index=False)
    again = Trainer(cfg, ds)
    assert again.state != seen["state"]
    assert again.resume(kept) == 3
    assert again.state == seen["state"]
    assert seen["state"].pool is not None and seen["state"].route_targets is not None and seen["state"].history
