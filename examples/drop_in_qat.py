"""A conventional torch.ao FX QAT script turned into EQ-Net supernet training.

The script is what a QAT codebase typically looks like: train a float model, `prepare_qat_fx` it, fine-tune it with
a plain training loop, evaluate. The lines marked ``# EQ-Net:`` are the only changes: the qconfig mapping, a
calibration call, the training step, and an evaluation that picks subnets. One training run gives a model that can
be cut at W8A8, W4A4, W2A2, symmetric or asymmetric, per-tensor or per-channel, without retraining.

Run:  python examples/drop_in_qat.py            (about a minute on a laptop CPU; --help for the budget flags)
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import eqnet_plugin as eq                                                    # EQ-Net:
from eqnet_plugin.app.data import digits_loaders
from eqnet_plugin.app.models import TinyResNet
from eqnet_plugin.train import bn_batches_from, evaluate, sandwich_step      # EQ-Net:


def train_float(model, loader, epochs, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--float-epochs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5, help="QAT (supernet) epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop QAT after this many steps (smoke tests)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=DeprecationWarning)          # torch.ao FX is deprecated upstream
    warnings.filterwarnings("ignore", message=".*reduce_range.*")
    t0 = time.perf_counter()

    train_loader, val_loader, test_loader = digits_loaders(args.batch_size, args.image_size, seed=0)
    model = TinyResNet()
    train_float(model, train_loader, args.float_epochs, args.lr)

    # qconfig_mapping = get_default_qat_qconfig_mapping("x86")
    qconfig_mapping = eq.elastic_qconfig_mapping()                            # EQ-Net: elastic fake-quants
    example_inputs = (next(iter(train_loader))[0],)
    model_prepared = prepare_qat_fx(model, qconfig_mapping, example_inputs)
    supernet = eq.Supernet(model_prepared)                                   # EQ-Net: view over the groups
    calib = bn_batches_from(train_loader.dataset, num_batches=8, batch_size=args.batch_size)   # EQ-Net:
    supernet.calibrate(calib)                                                # EQ-Net: initialize every cell

    # optimizer = torch.optim.Adam(model_prepared.parameters(), lr=args.lr)
    optimizer = eq.SubnetOptimizer(model_prepared.parameters(), torch.optim.Adam, lr=args.lr)  # EQ-Net: Adam per subnet
    steps = args.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(0)                             # EQ-Net: the subnet sampler
    model_prepared.train()
    step = 0
    for epoch in range(args.epochs):
        if args.max_steps is not None and step >= args.max_steps:
            break
        for x, y in train_loader:
            if args.max_steps is not None and step >= args.max_steps:
                break
            # optimizer.zero_grad()
            # loss = F.cross_entropy(model_prepared(x), y)
            # loss.backward()
            # optimizer.step()
            losses = sandwich_step(supernet, x, y, optimizer, generator=generator)   # EQ-Net: H/R/L, GPG, WDR
            scheduler.step()
            step += 1
        print(f"epoch {epoch + 1}: loss(H, R, L) = {float(losses['h']):.3f} {float(losses['r']):.3f} "
              f"{float(losses['l']):.3f}")

    # model_prepared.eval(); accuracy(model_prepared, test_loader)
    subnets = {                                                              # EQ-Net: pick subnets, no retraining
        "W8A8 sym per-channel": supernet.uniform(8, 8, symmetric=True, per_channel=True),
        "W4A4 asym per-tensor": supernet.uniform(4, 4, symmetric=False, per_channel=False),
        "W3A3 sym per-tensor": supernet.uniform(3, 3, symmetric=True, per_channel=False),
        "W2A2 sym per-channel": supernet.uniform(2, 2, symmetric=True, per_channel=True),
    }
    results = {}
    for name, cfg in subnets.items():
        results[name] = evaluate(supernet, cfg, test_loader, calib)          # EQ-Net: BN recalibrated per subnet
        print(f"accuracy {name}: {results[name]:.4f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return results


if __name__ == "__main__":
    main()
