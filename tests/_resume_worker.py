"""Resume worker for tests/unit/test_checkpoint.py: ``python tests/_resume_worker.py MODE CKPT OUT``.

MODE "first": train the tiny supernet for STOP steps (stopping mid-epoch, checkpoint written), then, from scratch in
the same process, the full run without interruption; saves the full run's final state to OUT.
MODE "second": a fresh process builds the same objects, resumes from CKPT, finishes the run and saves to OUT.
"""
from __future__ import annotations

import sys

import torch

from eqnet_plugin.train import TrainConfig, cosine_scheduler, train_supernet

from _tiny import tiny_data, tiny_loader, tiny_supernet

EPOCHS, STOP = 3, 6                     # 4 steps per epoch: stop in the middle of the second epoch


def build():
    train, val, _ = tiny_data(n_train=256)
    sn = tiny_supernet(seed=0)
    loader = tiny_loader(train, batch_size=64, seed=0)
    opt = torch.optim.Adam(sn.model.parameters(), lr=2e-3)
    sched = cosine_scheduler(opt, EPOCHS * len(loader))
    gen = torch.Generator().manual_seed(7)
    kw = dict(scheduler=sched, val_loader=[val.tensors], generator=gen)
    config = dict(epochs=EPOCHS, eval_configs={"w2a2": sn.uniform(2, 2)}, num_bn_batches=2)
    return sn, loader, opt, sched, gen, kw, config


def run(ckpt: str | None, max_steps: int | None = None):
    sn, loader, opt, sched, gen, kw, config = build()
    hist = train_supernet(sn, loader, opt, TrainConfig(**config, checkpoint_path=ckpt, max_steps=max_steps), **kw)
    # an RNG draw after training: equal only if the global RNG state was restored exactly
    return {"model": sn.model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "generator": gen.get_state(), "loader_generator": loader.generator.get_state(),
            "history_train": hist["train"], "history_eval": hist["eval"], "step": hist["step"],
            "active": sn.current_config().to_dict(), "rng_draw": torch.rand(3)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, ckpt, out = sys.argv[1:4]
    if mode == "first":
        partial = run(ckpt, max_steps=STOP)
        assert partial["step"] == STOP, partial["step"]
        torch.save(run(None), out)
    else:
        torch.save(run(ckpt), out)
