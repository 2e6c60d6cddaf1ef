"""The one import of torchao (``pip install 'eqnet_plugin[pt2e]'``, torchao==0.18.0): every module of
`eqnet_plugin.frontends.pt2e` takes torchao's names from here."""
try:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase as AOFakeQuantizeBase
    from torchao.quantization.pt2e.observer import _with_args as ao_with_args
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import (DerivedQuantizationSpec, FixedQParamsQuantizationSpec,
                                                     QuantizationSpec, Quantizer, SharedQuantizationSpec)
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
except ImportError as e:                                                   # pragma: no cover - import guard
    raise ImportError(f"eqnet_plugin.frontends.pt2e needs torchao ({e}); install it with pip install "
                      "'eqnet_plugin[pt2e]' (torchao==0.18.0)") from e

__all__ = ["AOFakeQuantizeBase", "ao_with_args", "convert_pt2e", "prepare_qat_pt2e", "DerivedQuantizationSpec",
           "FixedQParamsQuantizationSpec", "QuantizationSpec", "Quantizer", "SharedQuantizationSpec",
           "X86InductorQuantizer", "get_default_x86_inductor_quantization_config"]
