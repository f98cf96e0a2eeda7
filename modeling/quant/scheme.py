"""Weight-only quantization schemes and the `quantization_config` of a compressed-tensors checkpoint.

A scheme is what `emo-subset build --quantize` asks for and what a loaded
checkpoint declares: integer weights of `bits` (8 or 4), one scale per output
channel (`group_size` None) or per group of `group_size` inputs, symmetric or
with a zero point per scale. On disk it is compressed-tensors' `pack-quantized`
format (what llm-compressor writes for W8A16 / W4A16 and vLLM and transformers
read): per linear layer `weight_packed` (int32, `32 / bits` values per word,
offset by 2^(bits-1)), `weight_scale` [N, K / group], optionally
`weight_zero_point` (packed along the output dimension) and `weight_shape`.

Reading a config is plain dict parsing (the server must not import
compressed-tensors, whose package imports transformers at import time);
writing one goes through compressed-tensors' own pydantic schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..io.safetensors_io import CheckpointError

QUANT_METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
# gpt-oss's MXFP4 experts and block-scaled FP8 are read by the weight reader itself (modeling/quant/mxfp4.py, fp8.py)
HANDLED_ELSEWHERE = {"mxfp4", "fp8"}
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


class QuantizationError(CheckpointError):
    """A quantization request or a quantized checkpoint we cannot honour."""


@dataclass(frozen=True)
class WeightScheme:
    bits: int  # 8 or 4
    group_size: int | None  # None: one scale per output channel
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise QuantizationError(f"weight bits must be 4 or 8, not {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise QuantizationError(f"group size must be positive, not {self.group_size}")

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """A matrix this scheme can store: 2-D, its input dim a multiple of the group."""
        if len(shape) != 2:
            raise QuantizationError(f"{name}: only 2-D weights are quantized, shape is {list(shape)}")
        if self.group_size is not None and shape[1] % self.group_size:
            raise QuantizationError(f"{name}: group size {self.group_size} does not divide its input dimension "
                                    f"{shape[1]} (shape {list(shape)})")

    def describe(self) -> str:
        zp = "symmetric" if self.symmetric else "with zero points"
        per = "per output channel" if self.group_size is None else f"groups of {self.group_size}"
        return f"int{self.bits} weights, {per}, {zp}"

    # -- compressed-tensors' schema ------------------------------------------------
    def ct_args(self):
        from compressed_tensors.quantization import QuantizationArgs  # imports transformers: writing only

        return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy=self.strategy,
                                group_size=self.group_size, dynamic=False)

    def ct_scheme(self):
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme(targets=["Linear"], weights=self.ct_args())

    def quantization_config(self, ignore: list[str]) -> dict[str, Any]:
        """config.json's `quantization_config`, built and serialised by compressed-tensors."""
        from compressed_tensors.quantization import QuantizationConfig

        qc = QuantizationConfig(config_groups={"group_0": self.ct_scheme()}, format=PACKED_FORMAT,
                                quantization_status="compressed", ignore=list(ignore))
        d = qc.to_dict()
        d["quant_method"] = QUANT_METHOD
        return d


# What `--quantize` accepts.
PRESETS: dict[str, WeightScheme] = {
    "int8": WeightScheme(8, None, True),
    "int4": WeightScheme(4, 128, True),
    "int4-zp": WeightScheme(4, 128, False),
}


def preset(name: str, group_size: int | None = None) -> WeightScheme:
    if name not in PRESETS:
        raise QuantizationError(f"unknown quantization scheme {name!r} (known: {', '.join(PRESETS)})")
    s = PRESETS[name]
    if group_size is not None:
        if s.bits == 8:
            raise QuantizationError("int8 is per output channel; --group-size applies to int4")
        s = WeightScheme(s.bits, group_size, s.symmetric)
    return s


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's config.json declares: one weight scheme and the layers it leaves alone."""

    scheme: WeightScheme
    ignore: tuple[str, ...]
    format: str


def read_quantization_config(qc: Any, where: str) -> CheckpointQuantization | None:
    """Parse config.json's `quantization_config` (None when absent). Anything we
    cannot serve exactly as declared is a QuantizationError naming it."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise QuantizationError(f"{where}: quantization_config is not an object")
    method = qc.get("quant_method")
    if method in HANDLED_ELSEWHERE:
        return None
    if method != QUANT_METHOD:
        raise QuantizationError(f"{where}: quantization method {method!r} is not supported (only {QUANT_METHOD!r})")
    fmt = qc.get("format")
    if fmt != PACKED_FORMAT:
        raise QuantizationError(f"{where}: compressed-tensors format {fmt!r} is not supported (only {PACKED_FORMAT!r}, "
                                f"weight-only int4 / int8)")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        raise QuantizationError(f"{where}: expected exactly one config group, found {len(groups)}")
    (g,) = groups.values()
    w = (g or {}).get("weights") if isinstance(g, dict) else None
    if not isinstance(w, dict):
        raise QuantizationError(f"{where}: the config group has no weight quantization")
    if (g.get("input_activations") or g.get("output_activations")) is not None:
        raise QuantizationError(f"{where}: activation quantization is not supported (weight-only schemes only)")
    if w.get("type", "int") != "int":
        raise QuantizationError(f"{where}: weight type {w.get('type')!r} is not supported (int only)")
    strategy = w.get("strategy")
    bits = int(w.get("num_bits", 0))
    group = w.get("group_size")
    if strategy not in ("channel", "group"):
        raise QuantizationError(f"{where}: weight strategy {strategy!r} is not supported (channel or group)")
    if strategy == "group" and not group:
        raise QuantizationError(f"{where}: group strategy without a group_size")
    if w.get("actorder") not in (None, "static", False):
        raise QuantizationError(f"{where}: activation-ordered groups (actorder {w.get('actorder')!r}) are not supported")
    scheme = WeightScheme(bits, int(group) if strategy == "group" else None, bool(w.get("symmetric", True)))
    return CheckpointQuantization(scheme, tuple(qc.get("ignore") or ()), fmt)
