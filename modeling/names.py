"""Checkpoint tensor names, one table per family: the only place that spells them.

A family's checkpoints name the same parts differently (EMO's
`pre_attention_layernorm` is everyone else's `input_layernorm`, Mixtral keeps
its experts under `block_sparse_moe.experts.N.{w1,w3,w2}`). `TensorNames` holds
the Hugging Face hub layout (one tensor per expert), which is also what every
profile is written in, and the fused 3-D layout that transformers 5 keeps in
memory (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
[E, H, I]), which readers accept too.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPERT_PARTS = ("gate", "up", "down")  # SwiGLU: down(silu(gate(x)) * up(x))


@dataclass(frozen=True)
class TensorNames:
    """Names of one family's tensors (defaults: the OLMoE / Qwen3-MoE layout)."""

    model_type: str = "olmoe"
    attn_norm_name: str = "input_layernorm"
    mlp_norm_name: str = "post_attention_layernorm"
    moe_module: str = "mlp"  # the MoE block: router `{moe}.gate`, experts `{moe}.experts.N`
    fused_moe_module: str = "mlp"  # where transformers 5 keeps fused experts and the router in memory
    expert_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down
    shared_module: str = "mlp.shared_experts"  # a separate always-on shared-expert MLP (GLM)
    router_name: str = "gate"  # the router module inside the MoE block (gpt-oss: "router")
    stacked_experts: bool = False  # the family's own layout keeps experts stacked [E, ...] (gpt-oss); profiles too
    # where the language model lives: "model", or "model.language_model" in a multimodal layout (Qwen3.5)
    prefix: str = "model"
    # tensors of parts we do not serve (a vision tower, an MTP head): name prefix -> why; profiles leave them out
    not_served: tuple[tuple[str, str], ...] = ()

    lm_head = "lm_head.weight"

    @property
    def embed(self) -> str:
        return f"{self.prefix}.embed_tokens.weight"

    @property
    def final_norm(self) -> str:
        return f"{self.prefix}.norm.weight"

    def layer(self, i: int) -> str:
        return f"{self.prefix}.layers.{i}"

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a tensor name belongs to (`<prefix>.layers.N...`), or None for a tensor
        outside the layers (embeddings, final norm, lm_head, a vision tower). Every writer that orders
        or groups tensors by layer reads the index here."""
        head = f"{self.prefix}.layers."
        parts = name[len(head):].split(".", 1) if name.startswith(head) else []
        return int(parts[0]) if parts and parts[0].isdigit() else None

    def served(self, name: str) -> bool:
        return not any(name.startswith(p) for p, _ in self.not_served)

    def linear_attn(self, i: int, part: str) -> str:
        """A Gated DeltaNet tensor: part in in_proj_qkv.weight, conv1d.weight, A_log, dt_bias, norm.weight, ..."""
        return f"{self.layer(i)}.linear_attn.{part}"

    def attn_norm(self, i: int) -> str:
        return f"{self.layer(i)}.{self.attn_norm_name}.weight"

    def mlp_norm(self, i: int) -> str:
        return f"{self.layer(i)}.{self.mlp_norm_name}.weight"

    def proj(self, i: int, p: str, kind: str = "weight") -> str:  # p in q, k, v, o
        return f"{self.layer(i)}.self_attn.{p}_proj.{kind}"

    def mla(self, i: int, module: str, kind: str = "weight") -> str:
        """Multi-head latent attention (DeepSeek): q_a_proj, q_a_layernorm, kv_a_proj_with_mqa, kv_b_proj, ..."""
        return f"{self.layer(i)}.self_attn.{module}.{kind}"

    def sinks(self, i: int) -> str:  # gpt-oss: [heads] attention sink logits
        return f"{self.layer(i)}.self_attn.sinks"

    def qk_norm(self, i: int, p: str) -> str:  # p in q, k
        return f"{self.layer(i)}.self_attn.{p}_norm.weight"

    # -- the mixture of experts ---------------------------------------------------
    def router(self, i: int) -> str:
        return f"{self.layer(i)}.{self.moe_module}.{self.router_name}.weight"

    def router_logit_bias(self, i: int) -> str:
        """gpt-oss: a bias added to the router logits (choice and weights alike)."""
        return f"{self.layer(i)}.{self.moe_module}.{self.router_name}.bias"

    def router_bias(self, i: int) -> str:
        """DeepSeek-style `e_score_correction_bias` [E]: shifts the choice, not the weights."""
        return f"{self.layer(i)}.{self.moe_module}.gate.e_score_correction_bias"

    def fused_router(self, i: int) -> str:
        return f"{self.layer(i)}.{self.fused_moe_module}.{self.router_name}.weight"

    def fused_router_bias(self, i: int) -> str:
        return f"{self.layer(i)}.{self.fused_moe_module}.gate.e_score_correction_bias"

    def expert(self, i: int, j: int, p: str) -> str:  # p in gate, up, down
        part = self.expert_parts[EXPERT_PARTS.index(p)]
        return f"{self.layer(i)}.{self.moe_module}.experts.{j}.{part}.weight"

    def expert_tensor_names(self, i: int, j: int) -> list[str]:
        return [self.expert(i, j, p) for p in EXPERT_PARTS]

    def fused_gate_up(self, i: int) -> str:
        return f"{self.layer(i)}.{self.fused_moe_module}.experts.gate_up_proj"

    def fused_down(self, i: int) -> str:
        return f"{self.layer(i)}.{self.fused_moe_module}.experts.down_proj"

    def stacked(self, i: int, part: str, kind: str = "") -> str:
        """gpt-oss's stacked expert tensors: part in gate_up, down; kind "" (the
        float weights), "bias", or MXFP4 "blocks" / "scales"."""
        return f"{self.layer(i)}.{self.fused_moe_module}.experts.{part}_proj" + (f"_{kind}" if kind else "")

    def shared(self, i: int, p: str) -> str:  # p in gate, up, down
        return f"{self.layer(i)}.{self.shared_module}.{p}_proj.weight"

    def shared_gate(self, i: int) -> str:  # Qwen: [1, H], the shared expert's output times sigmoid(x . w)
        return f"{self.layer(i)}.{self.shared_module}_gate.weight"

    def dense(self, i: int, p: str, kind: str = "weight") -> str:
        return f"{self.layer(i)}.mlp.{p}_proj.{kind}"

    def routed_expert_tensors(self, i: int, num_experts: int) -> set[str]:
        """Every name (either layout) that holds per-expert rows of layer i: what a
        profile slices; everything else in the layer is copied unchanged."""
        out = {self.router(i), self.router_bias(i), self.fused_router(i), self.fused_router_bias(i),
               self.fused_gate_up(i), self.fused_down(i), self.router_logit_bias(i)}
        out.update(self.stacked(i, p, k) for p in ("gate_up", "down") for k in ("bias", "blocks", "scales"))
        for j in range(num_experts):
            per = self.expert_tensor_names(i, j)
            out.update(per)
            out.update(n + "_scale_inv" for n in per)  # block-scaled FP8 experts (modeling.quant.fp8)
        return out


EMO_NAMES = TensorNames("emo", "pre_attention_layernorm", "pre_feedforward_layernorm")
OLMOE_NAMES = TensorNames("olmoe")
QWEN3_MOE_NAMES = TensorNames("qwen3_moe")
GLM4_MOE_NAMES = TensorNames("glm4_moe")
GPT_OSS_NAMES = TensorNames("gpt_oss", router_name="router", stacked_experts=True)
MIXTRAL_NAMES = TensorNames("mixtral", moe_module="block_sparse_moe", expert_parts=("w1", "w3", "w2"))
# FlexOlmo (OLMo2 blocks): the layer's norms sit after attention and after the MLP
FLEX_OLMO_NAMES = TensorNames("flex_olmo", "post_attention_layernorm", "post_feedforward_layernorm")
DEEPSEEK_V3_NAMES = TensorNames("deepseek_v3")
GLM4_MOE_LITE_NAMES = TensorNames("glm4_moe_lite")
_MTP = ("mtp.", "multi-token-prediction head: not run")
QWEN3_NEXT_NAMES = TensorNames("qwen3_next", shared_module="mlp.shared_expert", not_served=(_MTP,))
QWEN3_5_MOE_NAMES = TensorNames("qwen3_5_moe", shared_module="mlp.shared_expert", prefix="model.language_model",
                                not_served=(("model.visual.", "vision tower: not served (text only)"), _MTP))
