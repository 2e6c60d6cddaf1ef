"""Calibration cost: `Supernet.calibrate` (every cell's grid search) vs one pass of torch.ao's default QAT observers.

Both see the same batches in the same run: the elastic supernet is ``prepare_qat_fx(model, elastic_qconfig_mapping(),
example, backend_config=elastic_backend_config() for MobileNets)``, calibrated with ``sn.calibrate(batches,
overwrite=True)``; the baseline is ``prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), example)`` run once
over the batches in train mode under ``torch.no_grad()`` (its observers update, as in the first epoch of QAT). Rounds
interleave the two (one warm-up round first, untimed) and the medians are reported.

Used by benchmarks/bench_step.py (`calibration_cost`); on its own it only prints (it writes nothing):
    OMP_NUM_THREADS=1 python benchmarks/_calibration_cost.py --models resnet18 mobilenet_v2 --sizes 28:16 64:8
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

CLASSES = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(model_name: str, example: torch.Tensor):
    """(supernet, torch.ao default-QAT model) of the same float model, on the example's device."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    import eqnet_plugin as eq
    from eqnet_plugin.app.models import build_model
    torch.manual_seed(0)
    model = build_model(model_name, CLASSES, in_channels=example.shape[1]).to(example.device).train()
    bc = eq.elastic_backend_config() if "mobilenet" in model_name else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sn = eq.Supernet(prepare_qat_fx(copy.deepcopy(model), eq.elastic_qconfig_mapping(), (example,),
                                        backend_config=bc))
        ao = prepare_qat_fx(copy.deepcopy(model), get_default_qat_qconfig_mapping("x86"), (example,)).train()
    return sn, ao


def calibration_cost(model_name: str, image_size: int, num_batches: int, batch_size: int, rounds: int,
                     device: str = "cpu") -> dict:
    """Median seconds of `sn.calibrate(batches)` and of one torch.ao observer pass over the same batches.

    Args:
        model_name: a name `eqnet_plugin.app.models.build_model` knows (``resnet18``, ``mobilenet_v2``,
            ``tiny_resnet``, ...); 3 input channels, 10 classes.
        image_size, num_batches, batch_size: the batches (seeded random normal inputs).
        rounds: timed rounds, each running both (after one untimed warm-up round).
        device: where the models and batches live.
    Returns:
        {"calibrate_s", "torch_ao_s", "ratio" (calibrate / torch.ao), "calibrate_all", "torch_ao_all" (per round),
        "model", "image_size", "num_batches", "batch_size", "rounds", "threads", "device"}.
    """
    if rounds < 1 or num_batches < 1 or batch_size < 1 or image_size < 1:
        raise ValueError("rounds, num_batches, batch_size and image_size must be positive integers")
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch_size, 3, image_size, image_size, generator=g).to(dev) for _ in range(num_batches)]
    sn, ao = _prepare(model_name, batches[0][:1])

    def run_ao() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                ao(b)
        _sync(dev)
        return time.perf_counter() - t0

    def run_calibrate() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        sn.calibrate(batches, overwrite=True)
        _sync(dev)
        return time.perf_counter() - t0

    run_ao(), run_calibrate()                                   # warm-up (allocator, first-call costs)
    t_ao, t_cal = [], []
    for _ in range(rounds):
        t_ao.append(run_ao())
        t_cal.append(run_calibrate())
    cal, base = statistics.median(t_cal), statistics.median(t_ao)
    return {"model": model_name, "image_size": image_size, "num_batches": num_batches, "batch_size": batch_size,
            "rounds": rounds, "threads": torch.get_num_threads(), "device": str(dev),
            "calibrate_s": cal, "torch_ao_s": base, "ratio": cal / base, "calibrate_all": t_cal, "torch_ao_all": t_ao}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--sizes", nargs="+", default=["28:16", "64:8"], help="image_size:num_batches pairs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    print("| model | input | batches | calibrate (s) | torch.ao observers (s) | ratio |\n|---|---|---|---|---|---|")
    for m in args.models:
        for spec in args.sizes:
            size, nb = (int(v) for v in spec.split(":"))
            c = calibration_cost(m, size, nb, args.batch_size, args.rounds, device=args.device)
            print(f"| {m} | {size}x{size} | {nb} x {args.batch_size} | {c['calibrate_s']:.2f} | {c['torch_ao_s']:.2f} "
                  f"| {c['ratio']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
