"""EQ-Net on torchao's PT2E flow with a Hugging Face transformer: a tiny BERT built offline (random weights).

    python examples/pt2e_transformer.py [--steps 20] [--out runs/pt2e_bert]

1. ``torch.export`` the model, ``prepare_qat_pt2e(..., ElasticQuantizer(space))`` (torchao's own prepare; fake-quants
   where torchao's x86 QAT recipe puts them, checked), ``eqnet_plugin.Supernet`` over it.
2. Calibrate, a few sandwich steps (H / R / L subnets with GPG and WDR) on a synthetic task, evaluate two subnets.
3. ``convert_pt2e`` of one subnet: torchao's standard Q/DQ graph, compared with the supernet's eval output.
4. ``freeze`` + ``export_onnx`` of the same subnet, run by ONNX Runtime.

Needs ``pip install -e ".[pt2e,export]"`` (torchao, transformers, onnx, onnxruntime). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import os
import warnings

import torch
from torch import nn


class Logits(nn.Module):
    """A Hugging Face classifier returning its logits tensor (what the losses and `sandwich_step` take)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def synthetic_batches(n: int, batch: int, vocab: int, seq: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences labelled by whether token 1 occurs more often than token 2 (a task attention can learn)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        marks = torch.randint(0, 3, (batch, seq), generator=g)            # 0: keep, 1: token 1, 2: token 2
        ids = torch.where(marks == 0, ids, marks)
        y = ((ids == 1).sum(1) > (ids == 2).sum(1)).long()
        out.append((ids, y))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="sandwich steps")
    ap.add_argument("--out", default="runs/pt2e_bert", help="folder for the ONNX file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from transformers import BertConfig, BertForSequenceClassification

    import eqnet_plugin as eq
    from eqnet_plugin.frontends.pt2e import ElasticQuantizer, check_placement

    torch.manual_seed(0)
    vocab, seq = 64, 16
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=seq, num_labels=2)
    model = Logits(BertForSequenceClassification(config)).train()
    train = synthetic_batches(args.steps, 32, vocab, seq, seed=0)
    val = synthetic_batches(4, 64, vocab, seq, seed=1)

    # 1. export + torchao's prepare with the elastic quantizer (any batch size: Dim.AUTO on the batch dimension)
    example = (train[0][0][:4],)
    exported = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    space = eq.ElasticSpace(weight_bits=(2, 4, 8), act_bits=(4, 8))
    gm = prepare_qat_pt2e(copy.deepcopy(exported), ElasticQuantizer(space))
    check_placement(exported, gm)                     # where torchao's x86 QAT recipe puts its fake-quants
    sn = eq.Supernet(gm)                              # a PT2E graph gets the PT2E frontend
    print(sn)

    # 2. calibrate, train, evaluate
    sn.calibrate(train[:2])
    optimizer = eq.SubnetOptimizer(gm.parameters(), torch.optim.Adam, lr=1e-3)   # one Adam state per subnet
    generator = torch.Generator().manual_seed(0)
    for i, (x, y) in enumerate(train):
        losses = eq.sandwich_step(sn, x, y, optimizer, generator=generator)      # GPG + WDR (SandwichConfig())
        if i % 5 == 0 or i == len(train) - 1:
            print(f"step {i:3d}  H {losses['h']:.3f}  R {losses['r']:.3f}  L {losses['l']:.3f}  "
                  f"WDR {losses['wdr']:.4f}")
    table = eq.evaluate_configs(sn, {"w8a8": sn.uniform(8, 8), "w4a4": sn.uniform(4, 4), "w2a4": sn.uniform(2, 4)},
                                val, None)
    print("accuracy:", {k: round(v, 3) for k, v in table.items()})

    # 3. torchao's standard quantized graph of one subnet: the same numbers as the supernet
    cfg = sn.sample(torch.Generator().manual_seed(1))
    x = val[0][0]
    gm.eval()
    with torch.no_grad(), sn.activate(cfg):
        expected = gm(x)
        converted = convert_pt2e(copy.deepcopy(gm))
    with torch.no_grad():
        same = torch.equal(converted(x), expected)
    n_q = sum(1 for n in converted.graph.nodes if "quantize_per" in str(n.target))
    print(f"convert_pt2e: {n_q} quantize/dequantize ops, outputs equal to the supernet: {same}")
    gm.train()

    # 4. ONNX Runtime
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime is not installed: pip install -e '.[export]' to run the ONNX step")
        return
    from eqnet_plugin.adapters import export_onnx
    frozen = sn.freeze(cfg)
    os.makedirs(args.out, exist_ok=True)
    path = export_onnx(frozen, example, os.path.join(args.out, "bert_subnet.onnx"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        diff = float((out - frozen(x)).abs().max())
    print(f"ONNX Runtime: {path}, max |ORT - torch| = {diff:.2e}")


if __name__ == "__main__":
    main()
