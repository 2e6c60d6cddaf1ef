"""DDP worker for tests/distributed/test_ddp.py::test_ddp_two_ranks_on_a_pt2e_graph, run as ``python
tests/_ddp_pt2e_worker.py OUT_DIR STEPS``: the parent process imports torch, torchao and eqnet_plugin once and forks
two ranks (gloo, a free local port) that inherit the imports, which is several seconds faster than
``torch.distributed.run`` importing them in every process. The parent runs no tensor op before forking.

Every rank exports the same tiny CNN (Conv-BN-ReLU, strided Conv-BN-ReLU, global average pool, Linear) with
``torch.export``, prepares it with ``eqnet_plugin.frontends.pt2e.prepare_qat`` (torchao's ``prepare_qat_pt2e`` with
`ElasticQuantizer`), calibrates it on rank-local data (statistics gathered over the ranks), wraps the prepared
GraphModule in `DistributedDataParallel` on gloo and runs STEPS sandwich steps through it, each rank on its own data.
It writes the state before and after training and what the test compares across ranks.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from eqnet_plugin import ElasticSpace, Supernet
from eqnet_plugin.train.distributed import shared_generator
from eqnet_plugin.frontends.pt2e import PT2EFrontend, prepare_qat
from eqnet_plugin.train import sample_sandwich, sandwich_step

SPACE = ElasticSpace(weight_bits=(4, 8), act_bits=(4, 8))
BATCH = 16
WORLD = 2


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def rank_main(rank: int, port: int, out_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)                                          # the same model on every rank
    model = TinyCNN()
    gm = prepare_qat(model, (torch.randn(4, 1, 8, 8),), SPACE)
    sn = Supernet(gm)
    g = torch.Generator().manual_seed(100 + rank)                 # different data on every rank
    x = torch.randn(steps * BATCH, 1, 8, 8, generator=g)
    y = torch.randint(10, (steps * BATCH,), generator=g)
    sn.calibrate([x[:BATCH]])                                     # rank-local data, statistics gathered
    ddp = DistributedDataParallel(gm)
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    gen = shared_generator(seed=7 + rank)                         # rank 0's seed is broadcast
    torch.save(gm.state_dict(), os.path.join(out_dir, f"before_{rank}.pt"))
    configs, losses = [], []
    for i in range(steps):
        cfgs = sample_sandwich(sn, gen)
        configs.append([c.to_dict() for c in cfgs])
        out = sandwich_step(sn, x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH], opt, model=ddp,
                            configs=cfgs)                                   # the default recipe: with WDR
        losses.append(float(out["total"]))
    torch.save(gm.state_dict(), os.path.join(out_dir, f"after_{rank}.pt"))
    with open(os.path.join(out_dir, f"rank_{rank}.json"), "w") as f:
        json.dump({"configs": configs, "losses": losses, "pt2e": isinstance(sn.frontend, PT2EFrontend),
                   "wrapped": type(ddp.module).__name__, "layers": len(sn.layers)}, f)
    dist.destroy_process_group()


def main(out_dir: str, steps: int) -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=rank_main, args=(r, port, out_dir, steps)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    print("exit codes", codes, flush=True)
    return 0 if codes == [0] * WORLD else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
