"""`config.json` of every supported family as one dataclass.

Every key that changes routing or attention is parsed here, once, through the
family's declaration (`modeling.families`); the rest of the code reads only
`ModelConfig`. A missing required key, an unknown `model_type` or a feature we
do not implement (a RoPE type, sliding windows) is a `ConfigError` that names
the file and the key.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .families import FAMILIES, Family, FamilyConfigError
from .quant.fp8 import Fp8Error, parse_fp8_config
from .layers.blocks import ROPE_TYPES, RopeConfig
from .names import TensorNames
from .layers.routing import RoutingRule

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
    intermediate_size: int  # of one routed expert
    experts_per_layer: list[int]  # routed experts; 0 = dense SwiGLU layer
    shared_per_layer: list[int]  # shared experts inside the router (EMO's last s slots)
    always_active_per_layer: list[list[int]]
    top_k: int
    norm_topk_prob: bool
    dense_intermediate_size: int | None
    dense_mlp_bias: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    qk_norm: str | None  # None, "proj" (whole projection, before the head split) or "head" (per head)
    clip_qkv: float | None
    attention_bias: bool  # q/k/v biases
    tie_word_embeddings: bool
    eos_token_ids: list[int]
    pad_token_id: int | None
    bos_token_id: int | None
    dtype: torch.dtype | None  # None: take it from the tensors
    routing: RoutingRule | None = None  # None: softmax top-k from top_k / norm_topk_prob
    shared_mlp_size: int = 0  # > 0: a separate always-on shared-expert MLP of this size (GLM)
    shared_gate: bool = False  # the shared MLP's output is gated by sigmoid(x . w) (Qwen3-Next, Qwen3.5)
    norm_offset: bool = False  # RMSNorm weights are zero-centred: scale by 1 + w (Qwen3-Next, Qwen3.5)
    o_bias: bool = False  # o_proj bias
    rope: RopeConfig = field(default_factory=RopeConfig)
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer; None: full attention
    # per layer: the attention kind (modeling.layers.attention.ATTENTION_KINDS), e.g. "full_attention"
    layer_types: list[str] = field(default_factory=list)
    attention_sinks: bool = False  # self_attn.sinks per layer (gpt-oss)
    router_logit_bias: bool = False  # the router's logits have a bias (gpt-oss)
    expert_mlp: str = "swiglu"  # or "clamped_swiglu" (gpt-oss; swiglu_alpha / swiglu_limit in `extra`)
    norm_placement: str = "pre"  # "pre": x + f(norm(x)); "post": x + norm(f(x)) (OLMo2-style, FlexOlmo)
    fp8_block: tuple[int, int] | None = None  # block-scaled FP8 weights (quantization_config quant_method fp8)
    extra: dict[str, Any] = field(default_factory=dict)  # a family's own settings (Family.parse_extra)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    source: str = "<dict>"

    def __post_init__(self):
        if self.routing is None:
            self.routing = RoutingRule(top_k=self.top_k, renormalise=self.norm_topk_prob)
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers
        if not self.layer_types:
            self.layer_types = ["full_attention" if w is None else "sliding_attention" for w in self.sliding_windows]

    # -- derived ---------------------------------------------------------------
    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def names(self) -> TensorNames:
        return self.family.names

    def is_dense(self, layer: int) -> bool:
        return self.experts_per_layer[layer] == 0

    def expert_groups(self, layer: int) -> list[int]:
        """The routing group of each of layer i's experts (local ids; all 0 unless group-limited)."""
        E = self.experts_per_layer[layer]
        return [self.routing.group_of(j, E) for j in range(E)]

    # -- parsing ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: config must be a JSON object")
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ConfigError(f"{source}: unknown model_type {mt!r}; supported: {', '.join(FAMILIES)}")
        fam = FAMILIES[mt]
        raw, d = d, fam.language_config(d)  # a multimodal layout keeps the language model's keys in text_config
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: key {fam.text_config_key!r} must be an object")
        d = {**d, "model_type": mt}

        def req(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if d.get(k) is not None:
                    return d[k]
            raise ConfigError(f"{source}: missing required key {key!r}")

        def opt(key: str, default: Any = None) -> Any:
            v = d.get(key)
            if v is None:
                v = fam.defaults.get(key)
            return default if v is None else v

        try:
            fam.check(d)
        except FamilyConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        rope = _parse_rope(d, fam, source)

        L = int(req("num_hidden_layers"))
        H = int(req("hidden_size"))
        heads = int(req("num_attention_heads"))
        kv = int(opt("num_key_value_heads", heads))
        head_dim = int(opt("head_dim", H // heads))
        if heads % kv:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")

        # Expert counts: our per-layer extension (profiles with per-layer counts), or the
        # family's own key with its own dense layers.
        per_layer = d.get("num_experts_per_layer")
        if per_layer is not None:
            experts = [int(x) for x in per_layer]
        else:
            E = int(req(*fam.expert_count_keys))
            dense = fam.dense_layers(d, L)
            experts = [0 if i in dense else E for i in range(L)]
        if len(experts) != L:
            raise ConfigError(f"{source}: 'num_experts_per_layer' has {len(experts)} entries for {L} layers")

        shared = [0] * L
        if fam.shared == "slots":
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
        inter = int(req(*fam.expert_size_keys)) if has_moe else int(opt(fam.expert_size_keys[0], 0))
        dense_inter = next((d[k] for k in fam.dense_size_keys if d.get(k) is not None), None)
        if has_dense and dense_inter is None:
            raise ConfigError(f"{source}: missing required key {fam.dense_size_keys[0]!r} (a layer has a dense MLP)")

        routing = _parse_routing(d, fam, opt, top_k, experts, source)
        shared_mlp = 0
        if fam.shared == "module" and has_moe:
            shared_mlp = int(req(fam.shared_size_key)) if fam.shared_size_key else inter * int(opt(fam.shared_count_key, 0))

        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
        dtype = parse_dtype(d.get("torch_dtype") or d.get("dtype"))
        clip = d.get("clip_qkv") if fam.clip_qkv else None
        qk_norm = fam.qk_norm if fam.qk_norm_key is None or opt(fam.qk_norm_key, False) else None
        attention_bias = bool(opt("attention_bias", False))
        try:
            extra = fam.parse_extra(d)
            windows = fam.sliding_windows(d, L)
            layer_types = fam.layer_types(d, L, windows)
            fp8_block = parse_fp8_config(d.get("quantization_config"))
        except (FamilyConfigError, Fp8Error) as e:
            raise ConfigError(f"{source}: {e}") from None
        from .layers.attention import ATTENTION_KINDS

        if len(layer_types) != L:
            raise ConfigError(f"{source}: 'layer_types' has {len(layer_types)} entries for {L} layers")
        bad = sorted({t for t in layer_types if t not in ATTENTION_KINDS})
        if bad:
            raise ConfigError(f"{source}: unknown layer type {bad[0]!r} in 'layer_types'; supported: "
                              f"{', '.join(ATTENTION_KINDS)}")

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
            norm_topk_prob=routing.renormalise,
            dense_intermediate_size=None if dense_inter is None else int(dense_inter),
            dense_mlp_bias=bool(opt("dense_mlp_bias", False)),
            rope_theta=rope.theta,
            rms_norm_eps=float(opt("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(opt("max_position_embeddings", 4096)),
            qk_norm=qk_norm,
            clip_qkv=None if clip is None else float(clip),
            attention_bias=attention_bias,
            tie_word_embeddings=bool(opt("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            bos_token_id=d.get("bos_token_id"),
            dtype=dtype,
            routing=routing,
            shared_mlp_size=shared_mlp,
            shared_gate=fam.shared_gate,
            norm_offset=fam.norm_offset,
            o_bias=attention_bias and fam.o_bias,
            rope=rope,
            sliding_windows=windows,
            layer_types=layer_types,
            fp8_block=fp8_block,
            norm_placement=fam.norm_placement,
            attention_sinks=fam.attention_sinks,
            router_logit_bias=fam.router_logit_bias,
            expert_mlp=fam.expert_mlp,
            extra=extra,
            raw=copy.deepcopy(raw),
            source=source,
        )

    def pruned_dict(self, kept_per_layer: dict[int, list[int]]) -> dict[str, Any]:
        """config.json of a checkpoint that keeps `kept_per_layer` (local expert ids).

        Experts are renumbered 0..n-1 in original order, so EMO's shared experts
        (the last s) stay last and always-active ids are renumbered to match.
        When every MoE layer keeps the same count, families that stock tools
        know get their own keys (the expert count reduced), so transformers loads
        the profile unchanged; otherwise (and for EMO) the counts go to our
        extension `num_experts_per_layer` (docs/families.md).
        """
        top = copy.deepcopy(self.raw)
        fam = self.family
        d, base = fam.language_config(top), fam.language_config(self.raw)  # where the expert count lives
        counts, always = [], []
        for i in range(self.num_layers):
            kept = sorted(kept_per_layer.get(i, range(self.experts_per_layer[i])))
            counts.append(len(kept))
            pos = {orig: new for new, orig in enumerate(kept)}
            always.append([pos[a] for a in self.always_active_per_layer[i] if a in pos])
        moe_counts = {c for c, e in zip(counts, self.experts_per_layer) if e > 0}
        full_dense = fam.dense_layers(base, self.num_layers) if "num_experts_per_layer" not in base else None
        uniform = (fam.stock_profile_config and len(moe_counts) == 1 and not any(always)
                   and full_dense == {i for i, e in enumerate(self.experts_per_layer) if e == 0})
        if uniform:
            key = fam.expert_count_key(base)
            d[key] = moe_counts.pop()
            for k in fam.expert_count_keys:
                if k != key and k in d and d[k] is not None:
                    d[k] = d[key]
            for k in ("num_experts_per_layer", "num_shared_experts_per_layer", "always_active_experts_per_layer"):
                d.pop(k, None)
            return top
        for key in (*fam.expert_count_keys, "num_experts", "num_local_experts", "always_active_experts"):
            d.pop(key, None)
        d["num_experts_per_layer"] = counts
        if fam.shared == "slots":
            d["num_shared_experts_per_layer"] = list(self.shared_per_layer)
            d["num_shared_experts"] = max(self.shared_per_layer, default=0)
        if any(always):
            d["always_active_experts_per_layer"] = always
        else:
            d.pop("always_active_experts_per_layer", None)
        return top


def _parse_rope(d: dict[str, Any], fam: Family, source: str) -> RopeConfig:
    params: dict[str, Any] = {}
    rtype = "default"
    for key in ("rope_scaling", "rope_parameters"):  # transformers 5's rope_parameters wins
        v = d.get(key)
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{source}: key {key!r} must be an object (got {v!r})")
        t = (v or {}).get("rope_type") or (v or {}).get("type")
        if t is not None and t not in ROPE_TYPES:  # refused wherever it is stated
            raise ConfigError(f"{source}: RoPE type {t!r} ({key}) is not supported; supported: {', '.join(ROPE_TYPES)}")
        params.update(v or {})
        rtype = t or rtype
    theta = params.get("rope_theta", d.get("rope_theta", fam.defaults.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor",
                         d.get("partial_rotary_factor", fam.defaults.get("partial_rotary_factor", 1.0)))
    if not 0 < float(partial) <= 1:
        raise ConfigError(f"{source}: partial_rotary_factor {partial} is not in (0, 1]")
    rest = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")}
    if rtype == "yarn":
        if rest.get("original_max_position_embeddings") is None:
            raise ConfigError(f"{source}: RoPE type 'yarn' needs 'original_max_position_embeddings' in rope_parameters")
        if rest.get("factor") is None:  # transformers: the ratio of the extended to the original context
            if d.get("max_position_embeddings") is None:
                raise ConfigError(f"{source}: RoPE type 'yarn' needs 'factor' (or 'max_position_embeddings')")
            rest["factor"] = d["max_position_embeddings"] / rest["original_max_position_embeddings"]
    return RopeConfig(str(rtype), float(theta), float(partial), rest)


def _parse_routing(d: dict[str, Any], fam: Family, opt, top_k: int, experts: list[int], source: str) -> RoutingRule:
    n_group = int(opt("n_group", 1)) if fam.group_limited else 1
    topk_group = int(opt("topk_group", 1)) if fam.group_limited else 1
    if n_group < 1 or not 1 <= topk_group <= n_group:
        raise ConfigError(f"{source}: n_group {n_group} / topk_group {topk_group}: need 1 <= topk_group <= n_group")
    for i, e in enumerate(experts):
        if e and e % n_group:
            raise ConfigError(f"{source}: n_group {n_group} does not divide the {e} routed experts of layer {i}")
        if e and n_group > 1 and top_k > topk_group * (e // n_group):
            raise ConfigError(f"{source}: num_experts_per_tok {top_k} is more than the {topk_group * (e // n_group)} "
                              f"experts of topk_group {topk_group} groups in layer {i}")
    return RoutingRule(
        top_k=top_k,
        scoring=fam.scoring,
        n_group=n_group,
        topk_group=topk_group,
        renormalise=True if fam.always_renormalise else bool(opt("norm_topk_prob", False)),
        scaling=float(opt(fam.scaling_key, 1.0)) if fam.scaling_key else 1.0,
        correction_bias=fam.correction_bias,
        router_float32=fam.router_float32,
    )


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
