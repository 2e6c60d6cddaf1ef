"""Supernet training under DistributedDataParallel: 2 CPU processes on gloo (the FX flow launched with torchrun;
the PT2E flow spawning its own two ranks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]          # tests/, where the workers live
STEPS = 12


def test_ddp_two_ranks_stay_identical_and_learn(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get(
        "PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_ddp_worker.py"), str(tmp_path), str(STEPS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1))
    # every rank sampled the same subnets every step (the generator seed was broadcast from rank 0)
    assert r0["configs"] == r1["configs"] and len(r0["configs"]) == STEPS
    assert len({json.dumps(c) for c in r0["configs"]}) == STEPS        # and they changed from step to step
    # calibration statistics were gathered: identical scales although each rank calibrated on its own data
    assert r0["scales"] == r1["scales"]
    # parameters and all buffers (quantizer cells, flags, BN statistics) are identical after training
    s0, s1 = torch.load(tmp_path / "state_0.pt"), torch.load(tmp_path / "state_1.pt")
    assert s0.keys() == s1.keys()
    differ = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not differ, differ[:5]
    # each rank trained on different data, so the losses differ; the loss went down on both
    assert r0["losses"] != r1["losses"]
    for r in (r0, r1):
        first, last = sum(r["losses"][:3]) / 3, sum(r["losses"][-3:]) / 3
        assert last < first, r["losses"]
    # only rank 0 wrote the checkpoint; sandwich_step without a generator under DDP names the fix
    assert r0["wrote"] is True and r1["wrote"] is False and (tmp_path / "ckpt.pt").exists()
    assert "shared_generator" in r0["error"] and "shared_generator" in r1["error"]
    assert "different subnets" in r0["mismatch"] and "different subnets" in r1["mismatch"]


DDP_STEPS = 2


def test_ddp_two_ranks_on_a_pt2e_graph(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "_ddp_pt2e_worker.py"), str(tmp_path), str(DDP_STEPS)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1))
    assert r0["pt2e"] and r0["wrapped"] == "GraphModule" and r0["layers"] == 3   # DDP wrapped the PT2E graph
    assert r0["configs"] == r1["configs"] and len(r0["configs"]) == DDP_STEPS    # the same subnets on both ranks
    assert len({json.dumps(c) for c in r0["configs"]}) == DDP_STEPS
    assert r0["losses"] != r1["losses"]                                  # each rank trained on its own data
    b0, b1, a0, a1 = (torch.load(tmp_path / f"{w}_{r}.pt") for w in ("before", "after") for r in (0, 1))
    assert b0.keys() == a0.keys() == a1.keys()
    assert not [k for k in b0 if not torch.equal(b0[k], b1[k])]          # calibration statistics were gathered
    differ = [k for k in a0 if not torch.equal(a0[k], a1[k])]
    assert not differ, differ[:5]                                       # parameters and buffers identical
    changed = {k for k in a0 if not torch.equal(a0[k], b0[k])}
    assert {"conv1.weight", "conv2.weight", "fc.weight", "fc.bias", "bn1.weight", "bn1.running_mean"} <= changed
    assert any(".scale_" in k for k in changed)                          # learned quantizer scales moved too
