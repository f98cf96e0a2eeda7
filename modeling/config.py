"""`config.json` of EMO (`model_type: "emo"`) and OLMoE (`"olmoe"`) as one dataclass.

Every key of emo-format.md that changes routing is parsed here, once; the rest
of the code reads only `ModelConfig`. A missing required key or an unknown
`model_type` is a `ConfigError` that names the file and the key.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("emo", "olmoe")

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # of one expert
    experts_per_layer: list[int]  # 0 = dense SwiGLU layer
    shared_per_layer: list[int]
    always_active_per_layer: list[list[int]]
    top_k: int
    norm_topk_prob: bool
    dense_intermediate_size: int | None
    dense_mlp_bias: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    qk_norm: bool
    clip_qkv: float | None
    attention_bias: bool
    tie_word_embeddings: bool
    eos_token_ids: list[int]
    pad_token_id: int | None
    bos_token_id: int | None
    dtype: torch.dtype | None  # None: take it from the tensors
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    source: str = "<dict>"

    # -- derived ---------------------------------------------------------------
    def is_dense(self, layer: int) -> bool:
        return self.experts_per_layer[layer] == 0

    # -- parsing ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: config must be a JSON object")

        def req(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if d.get(k) is not None:
                    return d[k]
            raise ConfigError(f"{source}: missing required key {key!r}")

        def opt(key: str, default: Any) -> Any:
            v = d.get(key)
            return default if v is None else v

        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: unknown model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if d.get("rope_scaling"):
            raise ConfigError(f"{source}: key 'rope_scaling' is not supported (got {d['rope_scaling']!r})")

        L = int(req("num_hidden_layers"))
        H = int(req("hidden_size"))
        heads = int(req("num_attention_heads"))
        kv = int(opt("num_key_value_heads", heads))
        head_dim = int(opt("head_dim", H // heads))
        if heads % kv:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")

        per_layer = d.get("num_experts_per_layer")
        if per_layer is not None:
            experts = [int(x) for x in per_layer]
        else:
            experts = [int(req("num_experts", "num_local_experts"))] * L
        if len(experts) != L:
            raise ConfigError(f"{source}: 'num_experts_per_layer' has {len(experts)} entries for {L} layers")

        shared_pl = d.get("num_shared_experts_per_layer")
        shared = [int(x) for x in shared_pl] if shared_pl is not None else [int(opt("num_shared_experts", 0))] * L
        if len(shared) != L:
            raise ConfigError(f"{source}: 'num_shared_experts_per_layer' has {len(shared)} entries for {L} layers")
        shared = [s if e > 0 else 0 for s, e in zip(shared, experts)]

        aa_pl = d.get("always_active_experts_per_layer")
        if aa_pl is not None:
            always = [list(map(int, a or [])) for a in aa_pl]
        else:
            always = [list(map(int, d.get("always_active_experts") or []))] * L
        if len(always) != L:
            raise ConfigError(f"{source}: 'always_active_experts_per_layer' has {len(always)} entries for {L} layers")

        top_k = int(req("num_experts_per_tok"))
        for i, (e, s, a) in enumerate(zip(experts, shared, always)):
            if e < 0 or s < 0 or s > e:
                raise ConfigError(f"{source}: layer {i} has {e} experts and {s} shared experts")
            if s and top_k < s:
                raise ConfigError(f"{source}: num_experts_per_tok {top_k} is smaller than {s} shared experts")
            if any(x < 0 or x >= e for x in a):
                raise ConfigError(f"{source}: always-active experts {a} out of range for layer {i} with {e} experts")
            if s and a:
                raise ConfigError(f"{source}: layer {i} has both shared and always-active experts")

        has_moe = any(e > 0 for e in experts)
        has_dense = any(e == 0 for e in experts)
        inter = int(req("intermediate_size")) if has_moe else int(opt("intermediate_size", 0))
        dense_inter = d.get("dense_intermediate_size")
        if has_dense and dense_inter is None:
            raise ConfigError(f"{source}: missing required key 'dense_intermediate_size' (a layer has 0 experts)")

        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
        dtype = parse_dtype(d.get("torch_dtype") or d.get("dtype"))
        clip = d.get("clip_qkv")

        return cls(
            model_type=mt,
            vocab_size=int(req("vocab_size")),
            hidden_size=H,
            num_layers=L,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=inter,
            experts_per_layer=experts,
            shared_per_layer=shared,
            always_active_per_layer=always,
            top_k=top_k,
            norm_topk_prob=bool(opt("norm_topk_prob", False)),
            dense_intermediate_size=None if dense_inter is None else int(dense_inter),
            dense_mlp_bias=bool(opt("dense_mlp_bias", False)),
            rope_theta=float(opt("rope_theta", 10000.0)),
            rms_norm_eps=float(opt("rms_norm_eps", 1e-6 if mt == "emo" else 1e-5)),
            max_position_embeddings=int(opt("max_position_embeddings", 4096)),
            qk_norm=(mt == "olmoe"),
            clip_qkv=None if clip is None else float(clip),
            attention_bias=bool(opt("attention_bias", False)),
            tie_word_embeddings=bool(opt("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            bos_token_id=d.get("bos_token_id"),
            dtype=dtype,
            raw=copy.deepcopy(d),
            source=source,
        )

    def pruned_dict(self, kept_per_layer: dict[int, list[int]]) -> dict[str, Any]:
        """config.json of a checkpoint that keeps `kept_per_layer` (original ids).

        Experts are renumbered 0..n-1 in original order, so the shared experts
        (the last s) stay last and always-active ids are renumbered to match.
        """
        d = copy.deepcopy(self.raw)
        counts, always = [], []
        for i in range(self.num_layers):
            kept = sorted(kept_per_layer.get(i, range(self.experts_per_layer[i])))
            counts.append(len(kept))
            pos = {orig: new for new, orig in enumerate(kept)}
            always.append([pos[a] for a in self.always_active_per_layer[i] if a in pos])
        for key in ("num_experts", "num_local_experts", "always_active_experts"):
            d.pop(key, None)
        d["num_experts_per_layer"] = counts
        d["num_shared_experts_per_layer"] = list(self.shared_per_layer)
        d["num_shared_experts"] = max(self.shared_per_layer, default=0)
        if any(always):
            d["always_active_experts_per_layer"] = always
        else:
            d.pop("always_active_experts_per_layer", None)
        return d


def load_config(path: str | Path) -> ModelConfig:
    """Parse `path` (a checkpoint folder or its config.json)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(f"{f}: no config.json found")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    return ModelConfig.from_dict(d, source=str(f))
