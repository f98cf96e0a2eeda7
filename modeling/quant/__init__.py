"""Weight-only quantization: compressed-tensors pack-quantized checkpoints (written by
`emo-subset build --quantize` / `emo-subset quantize`, served from the mapped file) and
the older in-memory lazy int8 (`load_model(quantize="int8")`)."""

from .lazy_int8 import Int8Cache
from .packed import PackedLinear
from .scheme import PRESETS, CheckpointQuantization, QuantizationError, WeightScheme, preset, read_quantization_config

__all__ = ["PRESETS", "CheckpointQuantization", "Int8Cache", "PackedLinear", "QuantizationError", "WeightScheme",
           "preset", "read_quantization_config"]
