"""Tiny checkpoints of the hybrid linear-attention families, written by transformers itself:
Qwen3-Next (`Qwen3NextForCausalLM`) and Qwen3.5-MoE in its published multimodal layout
(`Qwen3_5MoeForConditionalGeneration`: `text_config`, the language model under
`model.language_model.`, a vision tower under `model.visual.`), each with one tensor of a
multi-token-prediction head (`mtp.*`) added as the published checkpoints carry it.

Three Gated DeltaNet layers per full-attention layer (transformers' default pattern), a
shared expert with its sigmoid gate beside 8 routed experts, partial RoPE (0.25), gated
attention output. Norms (zero-centred: the model multiplies by 1 + w), A_log, dt_bias and
the gated norm are set away from their init values so that a reader ignoring one fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import families
from tests.families import _common

LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
              linear_conv_kernel_dim=4)
TEXT = _common(num_hidden_layers=4, head_dim=16, moe_intermediate_size=16, shared_expert_intermediate_size=24,
               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, **LINEAR)
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2)
HYBRID = ("qwen3_next", "qwen3_5_moe")


def hf_model(name: str, **text_over):
    transformers = pytest.importorskip("transformers")
    text = {**TEXT, **text_over}
    if name == "qwen3_next":
        return transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(intermediate_size=40, **text))
    cfg = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=VISION)
    return transformers.Qwen3_5MoeForConditionalGeneration(cfg)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """tests.families' perturbation (norms in 0.8..1.2, biases, dt_bias and A_log random), with the
    zero-centred norms (all but the gated one) moved to -0.2..0.2: the model scales by 1 + w."""
    families.perturb(model, seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and not n.endswith("linear_attn.norm.weight") and "visual" not in n:
                p.sub_(1.0)


def write_hybrid_checkpoint(folder: Path, name: str, seed: int = 0, **text_over):
    """Write family `name`'s checkpoint; returns the transformers model (float32, eval)."""
    torch.manual_seed(seed)
    model = hf_model(name, **text_over).float().eval()
    perturb(model, seed)
    model.save_pretrained(folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["mtp.fc.weight"] = torch.randn(TEXT["hidden_size"], 2 * TEXT["hidden_size"])  # an MTP head's tensor
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return model
