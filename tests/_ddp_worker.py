"""DDP worker for tests/distributed/test_ddp.py, launched with ``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/_ddp_worker.py OUT_DIR STEPS``: trains the tiny supernet with DistributedDataParallel on the
gloo backend, each rank on its own half of the data, and writes what the test compares across ranks."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from eqnet_plugin import SubnetOptimizer
from eqnet_plugin.train.distributed import RankMismatchError, shared_generator
from eqnet_plugin.train import sample_sandwich, sandwich_step, save_checkpoint

from _tiny import tiny_data, tiny_supernet


def main(out_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train, _, _ = tiny_data(n_train=256)
    x_all, y_all = train.tensors
    x, y = x_all[rank::world], y_all[rank::world]                 # different data on every rank
    sn = tiny_supernet(seed=0, calibration=x[:128])               # rank-local calibration data, gathered stats
    ddp = DistributedDataParallel(sn.model)
    opt = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=3e-3)       # the recommended recipe
    # a rank-dependent seed on purpose: shared_generator broadcasts rank 0's
    gen = shared_generator(seed=1234 + rank)
    error = ""
    try:
        sandwich_step(sn, x[:32], y[:32], opt, model=ddp)           # no generator under DDP -> clear error
    except ValueError as e:
        error = str(e)
    configs, losses = [], []
    for i in range(steps):
        j = (i * 32) % (len(x) - 32)
        cfgs = sample_sandwich(sn, gen)
        configs.append([c.to_dict() for c in cfgs])
        out = sandwich_step(sn, x[j:j + 32], y[j:j + 32], opt, model=ddp, configs=cfgs)    # with WDR (default)
        losses.append(float(out["total"]))
    wrote = save_checkpoint(os.path.join(out_dir, "ckpt.pt"), sn, opt, step=steps)
    torch.save(sn.model.state_dict(), os.path.join(out_dir, f"state_{rank}.pt"))
    # ranks that sample different subnets are caught instead of silently averaging unrelated gradients
    mismatch = ""
    own = sn.uniform(4, 4, symmetric=rank == 0)
    try:
        sandwich_step(sn, x[:32], y[:32], opt, model=ddp, configs=(own, own, own))
    except RankMismatchError as e:
        mismatch = str(e)
    with open(os.path.join(out_dir, f"rank_{rank}.json"), "w") as f:
        json.dump({"configs": configs, "losses": losses, "wrote": wrote, "error": error, "mismatch": mismatch,
                   "scales": {g: [p.detach().flatten().tolist() for p in fq.parameters()]
                              for g, fq in sn.groups.items()}}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
