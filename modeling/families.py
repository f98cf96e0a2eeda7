"""Model families: what differs between EMO, OLMoE, Qwen3-MoE, Mixtral, GLM-4.5, gpt-oss, DeepSeek-V3 /
Kimi-K2, GLM-4.7-Flash and FlexOlmo.

Each family is a small declaration: its `config.json` keys (where the expert
count and sizes live, which layers are dense), its tensor names
(`modeling.names`), the attention module of each layer (`layer_types`, words of
`modeling.layers.attention.ATTENTION_KINDS`) and its options (q/k norm over the
whole projection or per head, biases), its expert kind (`expert_mlp`), where
its norms sit (`norm_placement`) and its routing rule (`modeling.layers.routing.RoutingRule`:
softmax or sigmoid + correction bias, top-k or group-limited, renormalise,
scale) and where its shared experts live ("slots": EMO's last s experts inside
the router; "module": GLM's separate always-on `mlp.shared_experts` MLP).
`ModelConfig.from_dict` reads every family through these declarations, and the
forward pass, the pool mechanism, the builder and the server stay one
implementation over them.

Adding a family: subclass `Family` (override `dense_layers`, `layer_types`,
`check` or `parse_extra` where its config needs it), give it a `TensorNames`
table, and `register()` it (docs/architecture.md, "Adding a family"). A RoPE
variant is added to `modeling.layers.ROPE_TYPES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .names import (DEEPSEEK_V3_NAMES, EMO_NAMES, FLEX_OLMO_NAMES, GLM4_MOE_LITE_NAMES, GLM4_MOE_NAMES,
                    GPT_OSS_NAMES, MIXTRAL_NAMES, OLMOE_NAMES, QWEN3_5_MOE_NAMES, QWEN3_MOE_NAMES, QWEN3_NEXT_NAMES,
                    TensorNames)


class FamilyConfigError(ValueError):
    """Raised by a family's checks; `config.py` turns it into a ConfigError naming the file."""


@dataclass(frozen=True)
class Family:
    model_type: str
    names: TensorNames
    architecture: str  # transformers' class name (config.json "architectures")
    expert_count_keys: tuple[str, ...] = ("num_experts", "num_local_experts")  # the first present is read
    expert_size_keys: tuple[str, ...] = ("intermediate_size",)  # one routed expert's intermediate size
    dense_size_keys: tuple[str, ...] = ("dense_intermediate_size",)  # a dense layer's MLP
    # routing
    scoring: str = "softmax"
    always_renormalise: bool = False  # Mixtral renormalises whatever norm_topk_prob says
    group_limited: bool = False  # reads n_group / topk_group
    scaling_key: str | None = None  # routed_scaling_factor
    correction_bias: bool = False  # e_score_correction_bias per MoE layer (required when set)
    router_float32: bool = False  # the router product runs in float32
    router_logit_bias: bool = False  # the router has a bias on its logits (gpt-oss's mlp.router.bias)
    shared: str = "slots"  # "slots" (num_shared_experts inside the router) | "module" (separate MLP) | "none"
    shared_count_key: str = "n_shared_experts"  # for shared == "module"
    shared_size_key: str | None = None  # the shared MLP's own size (Qwen's shared_expert_intermediate_size)
    shared_gate: bool = False  # the shared MLP's output times sigmoid(x . w), w [1, H] (Qwen3-Next, Qwen3.5)
    # RMSNorm weights stored zero-centred: the model multiplies by 1 + w (Qwen3-Next, Qwen3.5)
    norm_offset: bool = False
    # a multimodal config.json keeps the language model's keys under this key (Qwen3.5: "text_config")
    text_config_key: str | None = None
    # attention
    qk_norm: str | None = None  # "proj": RMSNorm over the whole q/k projection (OLMoE); "head": per head (Qwen3, GLM)
    qk_norm_key: str | None = None  # a config key that switches the q/k norm on (GLM's use_qk_norm)
    clip_qkv: bool = False
    o_bias: bool = True  # attention_bias applies to o_proj too
    attention_sinks: bool = False  # a learned per-head logit in the attention softmax (gpt-oss's self_attn.sinks)
    # experts: "swiglu" down(silu(gate x) * up x), or "clamped_swiglu" (gpt-oss: gate/up interleaved, biases,
    # gate clamped above at swiglu_limit, up to +-limit, gate * sigmoid(alpha gate) * (up + 1))
    expert_mlp: str = "swiglu"
    # where a layer's two RMSNorms sit: "pre" (x + f(norm(x)), names' attn_norm / mlp_norm before each block)
    # or "post" (x + norm(f(x)), OLMo2-style: the norms after attention and after the MLP)
    norm_placement: str = "pre"
    # defaults of the family's config class, for keys a config.json leaves out
    defaults: dict[str, Any] = field(default_factory=dict)
    # profiles keeping the same count per MoE layer use the family's own keys (stock tools load them)
    stock_profile_config: bool = True
    gguf_arch: str | None = None  # llama.cpp's architecture name (GGUF export), None: llama.cpp has none

    def dense_layers(self, d: dict, num_layers: int) -> set[int]:
        """Layers whose MLP is dense in a full checkpoint of this family."""
        return set()

    def check(self, d: dict) -> None:
        """Refuse config features the forward pass does not implement."""

    def sliding_windows(self, d: dict, num_layers: int) -> list[int | None]:
        """The attention window of each layer (None: full causal attention)."""
        return [None] * num_layers

    def layer_types(self, d: dict, num_layers: int, windows: list[int | None]) -> list[str]:
        """The attention kind of each layer (a key of `modeling.layers.attention.ATTENTION_KINDS`).
        Default: grouped-query attention, sliding where the layer has a window."""
        return ["full_attention" if w is None else "sliding_attention" for w in windows]

    def parse_extra(self, d: dict) -> dict[str, Any]:
        """Family-specific settings kept on `ModelConfig.extra` (for later families)."""
        return {}

    def language_config(self, d: dict) -> dict:
        """The dict holding the language model's keys (the same object, for editing):
        `d` itself, or its `text_config_key` entry in a multimodal layout."""
        if self.text_config_key is not None and self.text_config_key in d:
            return d[self.text_config_key]
        return d

    def expert_count_key(self, d: dict) -> str:
        """The key this config.json holds its expert count under (written back in profiles)."""
        return next((k for k in self.expert_count_keys if d.get(k) is not None), self.expert_count_keys[0])


class _Qwen3Moe(Family):
    def dense_layers(self, d: dict, num_layers: int) -> set[int]:
        # transformers: sparse where (i not in mlp_only_layers) and (i + 1) % decoder_sparse_step == 0
        step = int(d.get("decoder_sparse_step") or 1)
        only = {int(x) for x in d.get("mlp_only_layers") or []}
        return {i for i in range(num_layers) if i in only or (i + 1) % step != 0}

    def check(self, d: dict) -> None:
        if d.get("use_sliding_window") and d.get("sliding_window") is not None:
            raise FamilyConfigError(f"sliding-window attention (sliding_window {d['sliding_window']}) is not supported")


class _Mixtral(Family):
    def check(self, d: dict) -> None:
        w, n = d.get("sliding_window"), d.get("max_position_embeddings")
        if w is not None and (n is None or int(w) < int(n)):
            raise FamilyConfigError(f"sliding-window attention (sliding_window {w}) is not supported")


class _Glm4Moe(Family):
    def dense_layers(self, d: dict, num_layers: int) -> set[int]:
        return set(range(min(int(d.get("first_k_dense_replace") or 0), num_layers)))


class _Mla(_Glm4Moe):
    """DeepSeek-V3's layout (Kimi-K2, DeepSeek-V3.1): multi-head latent attention in every
    layer, GLM-style MoE (sigmoid, correction bias, group-limited, shared-expert MLP)
    after `first_k_dense_replace` dense layers."""

    def dense_layers(self, d: dict, num_layers: int) -> set[int]:
        k = d.get("first_k_dense_replace")
        return set(range(min(int(self.defaults["first_k_dense_replace"] if k is None else k), num_layers)))

    def layer_types(self, d: dict, num_layers: int, windows: list[int | None]) -> list[str]:
        return ["mla"] * num_layers

    def parse_extra(self, d: dict) -> dict[str, Any]:
        def get(key):
            return d[key] if key in d else self.defaults.get(key)

        mla = {k: get(k) for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                   "v_head_dim")}
        for k, v in mla.items():
            if (v is None and k != "q_lora_rank") or (v is not None and (not isinstance(v, int) or v < 1)):
                raise FamilyConfigError(f"{k!r} is {v!r}; multi-head latent attention needs a positive integer")
        if mla["qk_rope_head_dim"] % 2:
            raise FamilyConfigError(f"'qk_rope_head_dim' {mla['qk_rope_head_dim']} is odd; RoPE rotates pairs")
        mla["rope_interleave"] = bool(get("rope_interleave"))
        # transformers computes the tables over head_dim (an alias of qk_rope_head_dim) x partial_rotary_factor;
        # anything but the whole rotary part would not even run there
        partial = (d.get("rope_parameters") or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if float(partial) != 1.0:
            raise FamilyConfigError(f"partial_rotary_factor {partial}: MLA rotates all qk_rope_head_dim dims")
        mla["rope_head_dim"] = mla["qk_rope_head_dim"]
        return {"mla": mla}


class _Glm4MoeLite(_Mla):
    """GLM-4.7-Flash: DeepSeek-V3's MLA and MoE, dense layers from `mlp_layer_types`."""

    def dense_layers(self, d: dict, num_layers: int) -> set[int]:
        types = d.get("mlp_layer_types") or ["dense"] + ["sparse"] * (num_layers - 1)
        if len(types) != num_layers or any(t not in ("dense", "sparse") for t in types):
            raise FamilyConfigError(f"'mlp_layer_types' {types} must hold 'dense' or 'sparse' for each of "
                                    f"{num_layers} layers")
        return {i for i, t in enumerate(types) if t == "dense"}


class _GptOss(Family):
    def sliding_windows(self, d: dict, num_layers: int) -> list[int | None]:
        # transformers' default: sliding on even layers, full on odd ones
        types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                         for i in range(num_layers)]
        if len(types) != num_layers:
            raise FamilyConfigError(f"'layer_types' has {len(types)} entries for {num_layers} layers")
        bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
        if bad:
            raise FamilyConfigError(f"'layer_types' holds {bad}; supported: sliding_attention, full_attention")
        w = d.get("sliding_window", 128)
        if "sliding_attention" in types and (w is None or int(w) < 1):
            raise FamilyConfigError(f"'sliding_window' is {w!r} but layer_types has sliding layers")
        return [int(w) if t == "sliding_attention" else None for t in types]

    def parse_extra(self, d: dict) -> dict[str, Any]:
        q = d.get("quantization_config")
        if q is not None and (not isinstance(q, dict) or q.get("quant_method") != "mxfp4"):
            raise FamilyConfigError(f"quantization_config {q!r} is not supported (only MXFP4 experts)")
        return {"swiglu_alpha": float(d.get("swiglu_alpha", 1.702)), "swiglu_limit": float(d.get("swiglu_limit", 7.0)),
                "mxfp4": q is not None}


class _Qwen3Hybrid(_Qwen3Moe):
    """Qwen3-Next and Qwen3.5-MoE: Gated DeltaNet ("linear_attention") and gated full attention
    layers (`layer_types`, or every `full_attention_interval`-th layer full), a gated shared
    expert beside the routed ones; multi-token-prediction tensors (`mtp.*`) are not run."""

    def check(self, d: dict) -> None:
        super().check(d)
        from .layers.gated_deltanet import DeltaNetShape

        try:
            DeltaNetShape.from_config({**d, "rms_norm_eps": d.get("rms_norm_eps", 1e-6)})
        except KeyError as e:
            raise FamilyConfigError(f"missing required key {e.args[0]!r} (the linear-attention layers need it)") from None
        except ValueError as e:
            raise FamilyConfigError(str(e)) from None

    def layer_types(self, d: dict, num_layers: int, windows: list[int | None]) -> list[str]:
        types = d.get("layer_types")
        if types is None:
            every = int(d.get("full_attention_interval") or 4)
            types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(num_layers)]
        # transformers' words; our full layers are the gated kind (modeling.layers.gated_deltanet.GatedAttention)
        return ["gated_attention" if t == "full_attention" else t for t in types]

    def parse_extra(self, d: dict) -> dict[str, Any]:
        from .layers.gated_deltanet import DeltaNetShape

        return {"deltanet": DeltaNetShape.from_config({**d, "rms_norm_eps": d.get("rms_norm_eps", 1e-6)}),
                "deltanet_fused": self.model_type == "qwen3_next"}  # in_proj_qkvz / in_proj_ba


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


register(Family("emo", EMO_NAMES, "EmoForCausalLM", stock_profile_config=False,
                defaults={"rms_norm_eps": 1e-6}))
register(Family("olmoe", OLMOE_NAMES, "OlmoeForCausalLM", qk_norm="proj", clip_qkv=True, gguf_arch="olmoe",
                defaults={"rms_norm_eps": 1e-5}))
register(_Qwen3Moe("qwen3_moe", QWEN3_MOE_NAMES, "Qwen3MoeForCausalLM", expert_size_keys=("moe_intermediate_size",),
                   dense_size_keys=("intermediate_size",), shared="none", qk_norm="head", gguf_arch="qwen3moe",
                   defaults={"rms_norm_eps": 1e-6}))
register(_Mixtral("mixtral", MIXTRAL_NAMES, "MixtralForCausalLM", expert_count_keys=("num_local_experts", "num_experts"),
                  always_renormalise=True, shared="none", o_bias=False, gguf_arch="llama",
                  defaults={"rms_norm_eps": 1e-5, "rope_theta": 1e6}))
register(_GptOss("gpt_oss", GPT_OSS_NAMES, "GptOssForCausalLM", expert_count_keys=("num_local_experts", "num_experts"),
                 always_renormalise=True, shared="none", router_logit_bias=True, attention_sinks=True,
                 expert_mlp="clamped_swiglu",
                 defaults={"rms_norm_eps": 1e-5, "attention_bias": True, "rope_theta": 150000.0,
                           "sliding_window": 128, "max_position_embeddings": 131072}))
register(_Glm4Moe("glm4_moe", GLM4_MOE_NAMES, "Glm4MoeForCausalLM",
                  expert_count_keys=("n_routed_experts", "num_local_experts"), expert_size_keys=("moe_intermediate_size",),
                  dense_size_keys=("intermediate_size",), scoring="sigmoid", group_limited=True,
                  scaling_key="routed_scaling_factor", correction_bias=True, router_float32=True, shared="module",
                  qk_norm="head", qk_norm_key="use_qk_norm", o_bias=False, gguf_arch="glm4moe",
                  defaults={"rms_norm_eps": 1e-5, "norm_topk_prob": True, "n_shared_experts": 1,
                            "partial_rotary_factor": 0.5}))
_MLA_MOE = dict(expert_count_keys=("n_routed_experts", "num_local_experts"), expert_size_keys=("moe_intermediate_size",),
                dense_size_keys=("intermediate_size",), scoring="sigmoid", group_limited=True,
                scaling_key="routed_scaling_factor", correction_bias=True, router_float32=True, shared="module")
register(_Mla("deepseek_v3", DEEPSEEK_V3_NAMES, "DeepseekV3ForCausalLM", **_MLA_MOE, gguf_arch="deepseek2",
              defaults={"rms_norm_eps": 1e-6, "norm_topk_prob": True, "n_shared_experts": 1, "n_group": 8,
                        "topk_group": 4, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3,
                        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "v_head_dim": 128,
                        "qk_nope_head_dim": 128, "rope_interleave": True}))
# Kimi-K2 (moonshotai) ships DeepSeek-V3's layout under its own model_type (config and modeling as remote code)
register(_Mla("kimi_k2", DEEPSEEK_V3_NAMES, "DeepseekV3ForCausalLM", **_MLA_MOE, gguf_arch="deepseek2",
              defaults=FAMILIES["deepseek_v3"].defaults))
register(_Glm4MoeLite("glm4_moe_lite", GLM4_MOE_LITE_NAMES, "Glm4MoeLiteForCausalLM", **_MLA_MOE,
                      gguf_arch="deepseek2",
                      defaults={"rms_norm_eps": 1e-5, "norm_topk_prob": True, "n_shared_experts": 1, "n_group": 1,
                                "topk_group": 1, "routed_scaling_factor": 1.8, "q_lora_rank": 768,
                                "kv_lora_rank": 512, "qk_rope_head_dim": 64, "v_head_dim": 256,
                                "qk_nope_head_dim": 192, "rope_interleave": True}))
# FlexOlmo (AllenAI): experts trained apart on each data owner's domain; OLMo2 blocks (post-norm), q/k norm
# over the whole projection, softmax top-k routing.
register(Family("flex_olmo", FLEX_OLMO_NAMES, "FlexOlmoForCausalLM", shared="none", qk_norm="proj",
                norm_placement="post", gguf_arch=None,
                defaults={"rms_norm_eps": 1e-6, "norm_topk_prob": False}))
_QWEN_HYBRID = dict(expert_size_keys=("moe_intermediate_size",), dense_size_keys=("intermediate_size",),
                    shared="module", shared_size_key="shared_expert_intermediate_size", shared_gate=True,
                    qk_norm="head", norm_offset=True)
register(_Qwen3Hybrid("qwen3_next", QWEN3_NEXT_NAMES, "Qwen3NextForCausalLM", gguf_arch="qwen3next",
                      defaults={"rms_norm_eps": 1e-6, "norm_topk_prob": True, "partial_rotary_factor": 0.25},
                      **_QWEN_HYBRID))
register(_Qwen3Hybrid("qwen3_5_moe", QWEN3_5_MOE_NAMES, "Qwen3_5MoeForConditionalGeneration", gguf_arch="qwen35moe",
                      always_renormalise=True,
                      text_config_key="text_config",
                      defaults={"rms_norm_eps": 1e-6, "partial_rotary_factor": 0.25}, **_QWEN_HYBRID))
