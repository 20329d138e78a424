"""Quantization: INT8 (weight-only or with dynamic per-token activations) and DeepSeek's block FP8.

    model = quantize_model(model, "int8")          # in place; see convert.py for what is quantized
    model.save(out_dir)                            # safetensors + config.json quantization_config
    model = nanoseek.load(out_dir)                 # loads quantized (checkpoint.py)
    rows = weight_errors(original, model)          # per-layer relative error (report.py)
"""

from nanoseek.quant.convert import SCHEMES, QuantizedTransformer, quantize_model

__all__ = ["SCHEMES", "QuantizedTransformer", "quantize_model"]
