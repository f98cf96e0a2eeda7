"""Tensor names and the weight store: the only place that knows checkpoint layouts.

A checkpoint's tensors become `LayerWeights` (attention, norms, router, dense
MLP) and an `ExpertStore` that addresses experts by (layer, original expert
id). Everything is a view of the memory-mapped files; no tensor data is read
here except when a dtype or device conversion is asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..layers.attention import AttentionWeights, attention_modules
from ..config import ModelConfig
from ..quant.fp8 import FP8_DTYPES, SCALE_SUFFIX, Fp8Error, Fp8Matrix, fp8_matrix
from ..quant.mxfp4 import DequantCache, Mxfp4Error, Mxfp4Matrix, check_pair
from ..expert_store import ExpertSlot, LayerExperts
from ..names import TensorNames
from ..quant import CheckpointQuantization, PackedLinear, read_quantization_config
from .safetensors_io import CheckpointError, CheckpointFiles

PROFILE_FILE = "profile.json"


# -- weights -------------------------------------------------------------------


@dataclass
class Expert:
    """One SwiGLU expert. `gate_up` is a zero-copy [2I, H] view when the file
    stores gate and up back to back (one GEMV instead of two).

    gpt-oss experts (`interleaved`): `gate_up` rows alternate gate, up (gate =
    rows 0::2), both products carry biases, and the weights may be MXFP4
    (`mx_gate_up` / `mx_down`, dequantized when a forward pass uses them; the
    float views are then None)."""

    gate: Tensor | None
    up: Tensor | None
    down: Tensor | None
    gate_up: Tensor | None = None
    gate_up_bias: Tensor | None = None
    down_bias: Tensor | None = None
    interleaved: bool = False
    mx_gate_up: Mxfp4Matrix | None = None
    mx_down: Mxfp4Matrix | None = None

    def matrices(self) -> list[Tensor | PackedLinear]:
        """The weight matrices as held (a compressed-tensors matrix as its PackedLinear)."""
        parts = (self.gate_up, self.down) if self.interleaved else (self.gate, self.up, self.down)
        return [t for t in parts if t is not None]

    def _extra_tensors(self) -> list[Tensor]:
        ts = []
        for m in (self.mx_gate_up, self.mx_down):
            if m is not None:
                ts += m.tensors()
        return ts + [t for t in (self.gate_up_bias, self.down_bias) if t is not None]

    def tensors(self) -> list[Tensor]:
        """Every stored tensor of the expert (MXFP4 blocks and scales as stored; a
        compressed-tensors matrix's views, or its repacked copy once used)."""
        ts = [x for m in self.matrices() for x in (m.tensors() if isinstance(m, (PackedLinear, Fp8Matrix)) else [m])]
        return ts + self._extra_tensors()

    def nbytes(self) -> int:
        return sum(weight_bytes(m) for m in self.matrices()) + sum(weight_bytes(t) for t in self._extra_tensors())

    def weights(self, dtype: torch.dtype, cache: DequantCache | None = None) -> tuple[Tensor, Tensor]:
        """(gate_up [2I, H], down [H, I]) in nn.Linear layout for an interleaved
        expert: views, or this expert's MXFP4 dequantized now (or from `cache`)."""
        def mx(m: Mxfp4Matrix) -> Tensor:
            return m.dequantize(dtype) if cache is None else cache.get(m, dtype)

        gu = self.gate_up if self.mx_gate_up is None else mx(self.mx_gate_up)
        dn = self.down if self.mx_down is None else mx(self.mx_down)
        return gu, dn


def weight_bytes(t: Tensor | PackedLinear | Fp8Matrix) -> int:
    """Bytes a weight takes in its checkpoint (a quantized one: packed values, scales, zero points)."""
    return t.nbytes() if isinstance(t, (PackedLinear, Fp8Matrix)) else t.numel() * t.element_size()


@dataclass
class LayerWeights:
    attn_norm: Tensor
    attn: "AttentionWeights"  # the layer's attention module's tensors (modeling.layers.attention)
    mlp_norm: Tensor
    experts: LayerExperts | None = None  # None for a dense layer
    dense: Expert | None = None
    shared_mlp: Expert | None = None  # GLM: an always-on MLP beside the routed experts
    shared_gate: Tensor | None = None  # Qwen3-Next, Qwen3.5: [1, H], the shared MLP's sigmoid gate
    dense_bias: tuple[Tensor, Tensor, Tensor] | None = None

    def __getattr__(self, role: str):
        # lw.q, lw.sinks, ...: the attention tensors by role, for readers written before the modules
        if role.startswith("__") or role == "attn":
            raise AttributeError(role)
        return getattr(self.attn, role)


@dataclass
class ModelWeights:
    embed: Tensor
    final_norm: Tensor
    lm_head: Tensor
    layers: list[LayerWeights]


class _Reader:
    """Reads named tensors from a checkpoint with shape checks and conversion.

    In a compressed-tensors checkpoint (config.json's `quantization_config`) a
    linear weight `X.weight` may be stored as `X.weight_packed` + `X.weight_scale`
    (+ `X.weight_zero_point`, `X.weight_shape`); `get` then returns a
    `PackedLinear` over views of those tensors."""

    def __init__(self, files: CheckpointFiles, dtype: torch.dtype, device: torch.device,
                 quant: CheckpointQuantization | None = None, fp8_block: tuple[int, int] | None = None):
        self.files, self.dtype, self.device, self.quant = files, dtype, device, quant
        self.fp8_block = fp8_block  # block-scaled FP8 checkpoints (modeling.quant.fp8): weights kept as stored
        self.mapped = [r for f in files.files.values() if (r := f.address_range()) is not None]

    def has(self, name: str) -> bool:
        return name in self.files or (name.endswith(".weight") and name + "_packed" in self.files)

    def get(self, name: str, shape: tuple[int, ...] | None) -> Tensor | PackedLinear:
        if name not in self.files and name.endswith(".weight") and name + "_packed" in self.files:
            return self.packed(name, shape)
        t = self.files.get(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.files.file_of(name)}: tensor {name!r} has shape {list(t.shape)}, the config implies {list(shape)}")
        if t.dtype in FP8_DTYPES:
            return self.fp8(name, t)
        return self.convert(t)

    def fp8(self, name: str, t: Tensor) -> Fp8Matrix:
        """An FP8 weight and its block scales as stored (dequantized per use, `Fp8Matrix.dequantize`)."""
        where = self.files.file_of(name)
        if self.fp8_block is None:
            raise CheckpointError(f"{where}: tensor {name!r} is {t.dtype}, but config.json has no "
                                  f"quantization_config with quant_method 'fp8'")
        scale = self.files.get(name + SCALE_SUFFIX) if name + SCALE_SUFFIX in self.files else None
        try:
            m = fp8_matrix(name, t, scale, self.fp8_block)
        except Fp8Error as e:
            raise CheckpointError(f"{where}: {e}") from None
        if self.device.type != "cpu":
            m = Fp8Matrix(m.weight.to(self.device), m.scale_inv.to(self.device), m.block)
        return m

    def convert(self, t: Tensor) -> Tensor:
        if t.dtype != self.dtype:
            t = t.to(self.dtype)
        if t.device != self.device:
            t = t.to(self.device)
        return t

    def packed(self, name: str, shape: tuple[int, ...] | None) -> PackedLinear:
        prefix = name[: -len("weight")]
        where = self.files.file_of(name + "_packed")
        if self.quant is None:
            raise CheckpointError(f"{where}: {name + '_packed'!r} is quantized, but config.json has no "
                                  f"quantization_config")
        s = self.quant.scheme
        for part in ("weight_scale",) + (() if s.symmetric else ("weight_zero_point",)):
            if prefix + part not in self.files:
                raise CheckpointError(f"{where}: tensor {prefix + part!r} is missing (the quantized weight "
                                      f"{name + '_packed'!r} needs it)")
        packed = self.files.get(prefix + "weight_packed")
        scale = self.files.get(prefix + "weight_scale")
        zp = None if s.symmetric else self.files.get(prefix + "weight_zero_point")
        if prefix + "weight_shape" in self.files:
            N, K = (int(v) for v in self.files.get(prefix + "weight_shape").tolist())
        elif shape is not None:
            N, K = shape
        else:
            raise CheckpointError(f"{where}: tensor {prefix + 'weight_shape'!r} is missing")
        if shape is not None and (N, K) != tuple(shape):
            raise CheckpointError(f"{where}: quantized tensor {name!r} has shape {[N, K]}, the config implies "
                                  f"{list(shape)}")
        G = 1 if s.group_size is None else K // s.group_size
        expect = {"weight_packed": (packed, torch.int32, (N, -(-K * s.bits // 32))),
                  "weight_scale": (scale, None, (N, G))}
        if zp is not None:
            expect["weight_zero_point"] = (zp, torch.int32, (-(-N * s.bits // 32), G))
        if s.group_size is not None and K % s.group_size:
            raise CheckpointError(f"{where}: group size {s.group_size} does not divide the input dimension {K} "
                                  f"of {name!r}")
        for part, (t, dt, shp) in expect.items():
            if tuple(t.shape) != shp or (dt is not None and t.dtype != dt):
                raise CheckpointError(f"{where}: tensor {prefix + part!r} is {t.dtype} {list(t.shape)}, "
                                      f"{s.describe()} of {[N, K]} needs {dt or 'float'} {list(shp)}")
        if self.device.type != "cpu":
            packed, scale = packed.to(self.device), scale.to(self.device)
            zp = None if zp is None else zp.to(self.device)
        return PackedLinear(name, s, (N, K), packed, scale, zp, self.mapped)

    def opt(self, name: str, shape: tuple[int, ...]) -> Tensor | None:
        return self.get(name, shape) if name in self.files else None


def original_expert_ids(folder: Path, cfg: ModelConfig) -> list[list[int]]:
    """Original ids per layer of a checkpoint's local experts.

    A profile folder (profile.json) or AllenAI's side file keeps them; a plain
    checkpoint's local ids are its original ids.
    """
    for fname, key in ((PROFILE_FILE, "kept_experts"), ("kept_experts.json", None)):
        f = folder / fname
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
            kept = d[key] if key else d
            out = [sorted(int(x) for x in kept[str(i)]) if cfg.experts_per_layer[i] else [] for i in range(cfg.num_layers)]
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f}: cannot read kept expert ids ({e})") from None
        for i, ids in enumerate(out):
            if len(ids) != cfg.experts_per_layer[i]:
                raise CheckpointError(f"{f}: layer {i} lists {len(ids)} kept experts, config.json has {cfg.experts_per_layer[i]}")
        return out
    return [list(range(e)) for e in cfg.experts_per_layer]


def _expert_views(files: CheckpointFiles, names: TensorNames, cfg: ModelConfig, i: int, j: int,
                  reader: _Reader) -> Expert:
    H, I = cfg.hidden_size, cfg.intermediate_size
    per = names.expert_tensor_names(i, j)
    if reader.has(per[0]):
        gate, up, down = (reader.get(n, s) for n, s in zip(per, ((I, H), (I, H), (H, I))))
        plain = per[0] in files and per[1] in files
        fused = files.adjacent_view(per[0], per[1]) if plain and reader.dtype == files.info(per[0]).dtype and reader.device.type == "cpu" else None
        if fused is not None:
            fused = fused.view(2 * I, H)
        return Expert(gate, up, down, fused)
    gu_name, d_name = names.fused_gate_up(i), names.fused_down(i)  # transformers 5's in-memory layout
    if gu_name not in files:
        raise CheckpointError(f"{files.folder}: tensor {per[0]!r} (or fused {gu_name!r}) is missing from the checkpoint")
    E = cfg.experts_per_layer[i]
    gu = reader.get(gu_name, (E, 2 * I, H))
    dn = reader.get(d_name, (E, H, I))
    return Expert(gu[j, :I], gu[j, I:], dn[j], gu[j])


def _stacked_experts(files: CheckpointFiles, cfg: ModelConfig, i: int, reader: _Reader) -> list[Expert]:
    """gpt-oss's experts of layer i, stacked as transformers keeps them: float
    `gate_up_proj` [E, H, 2I] / `down_proj` [E, I, H] (x @ W layout, so each
    expert's nn.Linear weight is a transposed view), or MXFP4 `*_blocks` /
    `*_scales` already in nn.Linear layout ([E, 2I, H/32, 16], [E, 2I, H/32]);
    biases `gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, H] always float."""
    n, E, H, I = cfg.names, cfg.experts_per_layer[i], cfg.hidden_size, cfg.intermediate_size
    gu_b = reader.get(n.stacked(i, "gate_up", "bias"), (E, 2 * I))
    dn_b = reader.get(n.stacked(i, "down", "bias"), (E, H))
    mats = {}
    for part, shape_t in (("gate_up", (E, H, 2 * I)), ("down", (E, I, H))):
        plain, blocks, scales = n.stacked(i, part), n.stacked(i, part, "blocks"), n.stacked(i, part, "scales")
        if plain in files:
            mats[part] = reader.get(plain, shape_t).transpose(1, 2)  # [E, out, in] view
        elif blocks in files or scales in files:
            for name in (blocks, scales):
                if name not in files:
                    raise CheckpointError(f"{files.folder}: tensor {name!r} is missing from the checkpoint "
                                          f"(MXFP4 {part}_proj needs both _blocks and _scales)")
            b, sc = files.get(blocks), files.get(scales)
            try:
                check_pair(blocks, b, scales, sc, (E, shape_t[2], shape_t[1]))
            except Mxfp4Error as e:
                raise CheckpointError(f"{files.file_of(blocks)}: {e}") from None
            if reader.device.type != "cpu":
                b, sc = b.to(reader.device), sc.to(reader.device)
            mats[part] = (b, sc)
        else:
            raise CheckpointError(f"{files.folder}: tensor {plain!r} (or MXFP4 {blocks!r}) is missing from the checkpoint")
    out = []
    for j in range(E):
        e = Expert(None, None, None, gate_up_bias=gu_b[j], down_bias=dn_b[j], interleaved=True)
        gu, dn = mats["gate_up"], mats["down"]
        if isinstance(gu, tuple):
            e.mx_gate_up = Mxfp4Matrix(gu[0][j], gu[1][j])
        else:
            e.gate_up = gu[j]
        if isinstance(dn, tuple):
            e.mx_down = Mxfp4Matrix(dn[0][j], dn[1][j])
        else:
            e.down = dn[j]
        out.append(e)
    return out


def read_layer_experts(folder: Path, files: CheckpointFiles, cfg: ModelConfig, i: int, reader: _Reader,
                       ids: list[int], repaired: bool = False) -> LayerExperts:
    """The experts of layer i; `ids` are their original ids (see original_expert_ids);
    `repaired`: the folder's experts are a repair (profile.json "repair")."""
    names = cfg.names
    E, s = cfg.experts_per_layer[i], cfg.shared_per_layer[i]
    rname = names.router(i) if names.router(i) in files or names.fused_router(i) not in files else names.fused_router(i)
    router = reader.get(rname, (E, cfg.hidden_size))
    bias = None
    if cfg.routing.correction_bias:
        bname = names.router_bias(i) if names.router_bias(i) in files else names.fused_router_bias(i)
        if bname not in files:
            raise CheckpointError(f"{files.folder}: tensor {names.router_bias(i)!r} (the router's correction bias, "
                                  f"which {cfg.model_type} routing needs) is missing from the checkpoint")
        bias = reader.get(bname, (E,))
    logit_bias = reader.get(names.router_logit_bias(i), (E,)) if cfg.router_logit_bias else None
    stacked = _stacked_experts(files, cfg, i, reader) if cfg.expert_mlp == "clamped_swiglu" else None
    groups = cfg.expert_groups(i)
    slots = [ExpertSlot(ids[j], str(folder), stacked[j] if stacked is not None else
                        _expert_views(files, names, cfg, i, j, reader), router[j], shared=j >= E - s,
                        always_active=j in cfg.always_active_per_layer[i], group=groups[j],
                        bias=None if bias is None else bias[j],
                        logit_bias=None if logit_bias is None else logit_bias[j], repaired=repaired)
             for j in range(E)]
    # the checkpoint's own router view, no copy, when its rows are already in original-id order
    in_order = all(ids[j] < ids[j + 1] for j in range(E - 1))
    return LayerExperts(slots, reader.device, router if in_order else None)


def read_weights(folder: Path, files: CheckpointFiles, cfg: ModelConfig, dtype: torch.dtype,
                 device: torch.device, repaired: bool = False) -> ModelWeights:
    """Views of every tensor the config calls for, shapes checked against it
    (`repaired`: the folder's experts are a repair, profile.json "repair")."""
    r = _Reader(files, dtype, device, read_quantization_config(cfg.raw.get("quantization_config"), str(folder / "config.json")),
                cfg.fp8_block)
    n = cfg.names
    H, V = cfg.hidden_size, cfg.vocab_size
    embed = r.get(n.embed, (V, H))
    lm_head = embed if cfg.tie_word_embeddings and n.lm_head not in files else r.get(n.lm_head, (V, H))
    orig_ids = original_expert_ids(folder, cfg)
    layers = []
    for i, module in enumerate(attention_modules(cfg)):
        lw = LayerWeights(attn_norm=r.get(n.attn_norm(i), (H,)), attn=module.read(r, n),
                          mlp_norm=r.get(n.mlp_norm(i), (H,)))
        if cfg.is_dense(i):
            D = cfg.dense_intermediate_size
            lw.dense = Expert(r.get(n.dense(i, "gate"), (D, H)), r.get(n.dense(i, "up"), (D, H)),
                              r.get(n.dense(i, "down"), (H, D)))
            if cfg.dense_mlp_bias:
                lw.dense_bias = (r.get(n.dense(i, "gate", "bias"), (D,)), r.get(n.dense(i, "up", "bias"), (D,)),
                                 r.get(n.dense(i, "down", "bias"), (H,)))
        else:
            lw.experts = read_layer_experts(folder, files, cfg, i, r, orig_ids[i], repaired)
            if cfg.shared_mlp_size:
                S = cfg.shared_mlp_size
                lw.shared_mlp = Expert(r.get(n.shared(i, "gate"), (S, H)), r.get(n.shared(i, "up"), (S, H)),
                                       r.get(n.shared(i, "down"), (H, S)))
                if cfg.shared_gate:
                    lw.shared_gate = r.get(n.shared_gate(i), (1, H))
        layers.append(lw)
    return ModelWeights(embed=embed, final_norm=r.get(n.final_norm, (H,)), lm_head=lm_head, layers=layers)
