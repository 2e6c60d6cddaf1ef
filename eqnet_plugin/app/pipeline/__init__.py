"""The EQ-Net flow as library functions: the stages the `eqnet` command line (and its demo) runs.

Where things live: `spec` (the `RunSpec` and subnet names), `models` (data by name; models by name are
`eqnet_plugin.app.models.build_model`), `stages` (build, train, reload, measure), `search` (records, predictor,
search), `export` (freeze and write through the target registry), `tables`.

    spec = RunSpec(model="tiny_resnet", data="digits")
    exp = build_experiment(spec, BuildSettings(float_epochs=10))     # data -> float model -> prepare -> calibrate
    train_experiment(exp, epochs=20, checkpoint="runs/x/supernet.pt")
    exp = load_experiment("runs/x/supernet.pt")                      # rebuild from the checkpoint alone
    table = uniform_table(exp)                                       # accuracy of uniform subnets (test split)
    out = search_experiment(exp, "runs/x/search", SearchSettings(profile="qnn", constraints={"max_bitops": 1e8}))
    export_subnet(exp, out.result.best.config, "qnn", "runs/x/exports/qnn")

A supernet meant for TensorRT calibrates its activations on the signed grid
(``BuildSettings(signed_activations=signed_activations_for(["tensorrt"]))``): TensorRT then runs exactly the
subnets that were trained, and its export refuses supernets calibrated otherwise.

Models: ``tiny_resnet`` / ``tiny_mobilenet_v2`` (`eqnet_plugin.app.models`), any torchvision classification model by
name (``resnet18``, ``mobilenet_v2``, ...), or ``package.module:callable``. Data: ``digits`` (embedded),
``fashion-mnist`` / ``mnist`` (IDX files; ``fashion-mnist:<folder>``), a local ImageFolder tree or a CIFAR-10
python batches folder. Bad input raises ValueError / FileNotFoundError with a message that names the fix (the
command line prints it as one line).
"""
from __future__ import annotations

from ..models import COMPACT_MODELS, build_model, model_in_channels
from .export import (ExportOutcome, ExportPlan, ExportRefused, export_problems, export_subnet, export_targets,
                     finetune_subnet, freeze_subnet, get_target, onnx_agreement, signed_activations_for, target_names)
from .models import load_data
from .search import SearchOutcome, SearchSettings, collect, default_bitops_fraction, fit_predictor, search_experiment
from .spec import DEFAULT_FOLDER_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, SCHEMES, RunSpec, parse_subnet, uniform_config
from .stages import (BuildSettings, Experiment, activations_signed, build_experiment, load_experiment, read_run_spec,
                     resume_conflicts, resume_error, train_experiment, uniform_table)
from .tables import format_table, write_json

__all__ = ["RunSpec", "Experiment", "BuildSettings", "SearchSettings", "ExportPlan", "ExportOutcome",
           "ExportRefused", "SCHEMES", "target_names", "get_target", "build_model", "load_data", "build_experiment",
           "train_experiment", "load_experiment", "activations_signed", "signed_activations_for", "read_run_spec",
           "resume_conflicts", "resume_error", "uniform_config", "export_problems", "parse_subnet", "uniform_table",
           "SearchOutcome", "search_experiment", "default_bitops_fraction", "freeze_subnet", "finetune_subnet",
           "export_subnet", "export_targets", "onnx_agreement", "fit_predictor", "collect", "model_in_channels",
           "write_json", "format_table", "COMPACT_MODELS", "DEFAULT_IMAGE_SIZE", "DEFAULT_FOLDER_IMAGE_SIZE"]
