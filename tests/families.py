"""Tiny checkpoints of every stock-transformers family, written by transformers
itself (`AutoModelForCausalLM.from_config(...).save_pretrained`), with biases,
correction biases and norm weights set to non-trivial values first (they are
zeros and ones at init, which would hide a reader that ignores them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

IDS = [5, 17, 42, 3, 99, 250, 7, 64, 128, 31, 2, 200]


def _common(**over) -> dict:
    d = dict(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6, eos_token_id=0,
             pad_token_id=1, bos_token_id=None)
    d.update(over)
    return d


# name -> (config class name, keyword arguments)
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    # Qwen3-MoE: per-head q/k norm, GQA, head_dim != hidden/heads, a dense layer from mlp_only_layers,
    # biases on q/k/v/o.
    "qwen3_moe": ("Qwen3MoeConfig", _common(head_dim=16, intermediate_size=40, moe_intermediate_size=16,
                                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                            mlp_only_layers=[1], decoder_sparse_step=1, attention_bias=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Qwen3-MoE with decoder_sparse_step 2 (layers 1, 3 sparse) and no renormalisation.
    "qwen3_moe-step": ("Qwen3MoeConfig", _common(num_hidden_layers=4, head_dim=8, intermediate_size=24,
                                                 moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                                                 norm_topk_prob=False, decoder_sparse_step=2)),
    # Mixtral: block_sparse_moe, w1/w3/w2, always renormalised.
    "mixtral": ("MixtralConfig", _common(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # GLM-4.5 style: sigmoid + correction bias, group-limited choice, scaling, a shared-expert MLP, a dense
    # first layer, per-head q/k norm, partial RoPE, q/k/v biases.
    "glm4_moe": ("Glm4MoeConfig", _common(head_dim=16, intermediate_size=40, moe_intermediate_size=16,
                                          n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                                          n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                                          routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 0.5})),
    # GLM-4.5-Air's own settings: one group, no q/k norm, two shared experts.
    "glm4_moe-air": ("Glm4MoeConfig", _common(head_dim=8, intermediate_size=40, moe_intermediate_size=16,
                                              n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                              n_group=1, topk_group=1, first_k_dense_replace=1,
                                              norm_topk_prob=True, routed_scaling_factor=1.0, use_qk_norm=False,
                                              partial_rotary_factor=0.5, rope_theta=10000.0)),
    # gpt-oss: sinks, sliding windows of 4 on layers 0 and 2 (IDS is longer), YaRN, q/k/v/o biases, router
    # bias, interleaved clamped-SwiGLU experts with biases (swiglu_limit low enough that the clamp bites).
    "gpt_oss": ("GptOssConfig", _common(head_dim=8, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                                        sliding_window=4, swiglu_limit=0.3, attention_bias=True,
                                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                         "beta_fast": 8.0, "beta_slow": 1.0, "truncate": False,
                                                         "original_max_position_embeddings": 32})),
    # DeepSeek-V3 (Kimi-K2, V3.1): MLA with low-rank q, interleaved decoupled RoPE, q_a/kv_a/o biases;
    # GLM-style MoE: sigmoid + correction bias, 2 groups, scaling, a shared-expert MLP, one dense layer.
    "deepseek_v3": ("DeepseekV3Config", _common(num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                                                n_shared_experts=1, num_experts_per_tok=3, n_group=2, topk_group=1,
                                                first_k_dense_replace=1, norm_topk_prob=True,
                                                routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=12,
                                                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                                                attention_bias=True, rope_interleave=True,
                                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # DeepSeek-V2-Lite-like attention: one q_proj (no q rank), rotate-half RoPE, YaRN with mscale_all_dim
    # (the softmax scale changes too), no renormalisation.
    "deepseek_v3-yarn": ("DeepseekV3Config", _common(num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=16,
                                                     n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                                     n_group=1, topk_group=1, first_k_dense_replace=0,
                                                     norm_topk_prob=False, routed_scaling_factor=1.5,
                                                     q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=6,
                                                     qk_rope_head_dim=4, v_head_dim=8, rope_interleave=False,
                                                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                      "factor": 4.0, "mscale": 1.0,
                                                                      "mscale_all_dim": 1.0,
                                                                      "original_max_position_embeddings": 32})),
    # GLM-4.7-Flash: DeepSeek's MLA and MoE, dense layers from mlp_layer_types.
    "glm4_moe_lite": ("Glm4MoeLiteConfig", _common(num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=16,
                                                   n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                                   mlp_layer_types=["dense", "sparse", "sparse"],
                                                   norm_topk_prob=True, routed_scaling_factor=1.8, q_lora_rank=16,
                                                   kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                   v_head_dim=6, attention_bias=True, rope_interleave=True,
                                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # FlexOlmo: OLMo2 post-norm blocks (norms after attention and after the MoE), q/k norm over the projection.
    "flex_olmo": ("FlexOlmoConfig", _common(intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                                            norm_topk_prob=False, attention_bias=True)),
    "olmoe": ("OlmoeConfig", _common(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                     clip_qkv=None)),
}


def hf_config(name: str, **over):
    transformers = pytest.importorskip("transformers")
    cls_name, kw = FAMILY_CONFIGS[name]
    return getattr(transformers, cls_name)(**{**kw, **over})


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights with a spread-out router; biases and norms away from 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1:
                std = 0.5 if n.endswith("gate.weight") else 0.1
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif n.endswith("sinks"):  # attention sinks: logits that take a visible share of the mass
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in n:
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def write_hf_checkpoint(folder: Path, name: str, seed: int = 0, **over):
    """A checkpoint of family `name` written by transformers; returns the transformers model (float32, eval)."""
    transformers = pytest.importorskip("transformers")
    cfg = hf_config(name, **over)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    perturb(model, seed)
    model.save_pretrained(folder)
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def stock(folder):
    """The checkpoint as stock transformers loads it (float32); nothing missing, nothing left over."""
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled FP8 as DeepSeek publishes it: float8_e4m3fn values and float32 `weight_scale_inv`
    (block max-abs / 448) over a ceil-divided grid of `block` tiles."""
    N, K = w.shape
    bn, bk = block
    gn, gk = -(-N // bn), -(-K // bk)
    padded = torch.zeros(gn * bn, gk * bk, dtype=torch.float32)
    padded[:N, :K] = w.float()
    tiles = padded.reshape(gn, bn, gk, bk)
    scale = (tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0).float()
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).reshape(gn * bn, gk * bk)[:N, :K]
    return q.contiguous().to(torch.float8_e4m3fn), scale


def write_fp8_checkpoint(folder: Path, name: str, block: tuple[int, int] = (8, 8), seed: int = 0, **over):
    """A family checkpoint written by transformers, then every linear weight inside the layers but the
    router stored as block-scaled FP8 (`quant_method: fp8`), as DeepSeek-V3 / Kimi-K2 ship. Only weights
    the block divides are quantized (transformers' own rule), so stock transformers loads it too."""
    import json

    from safetensors.torch import load_file, save_file

    model = write_hf_checkpoint(folder, name, seed=seed, **over)
    t = load_file(str(folder / "model.safetensors"))
    out = {}
    for k, v in t.items():
        if (v.dim() == 2 and k.startswith("model.layers.") and not k.endswith("mlp.gate.weight")
                and v.shape[0] % block[0] == 0 and v.shape[1] % block[1] == 0):
            out[k], out[k + "_scale_inv"] = quantize_fp8(v, block)
        else:
            out[k] = v
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block),
                                  "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return model


def check_ragged_batch(m, cache, atol: float) -> None:
    """Three sequences in one packed prefill (slots 3, 0, 2 of `cache`), then decode steps for two of them
    and a 2-token chunk of the third in one batch: every row equals recomputing its sequence alone."""
    from modeling import Batch

    seqs = [IDS[:9], IDS[2:5], IDS]
    slots = [3, 0, 2]
    out = m.forward(Batch(torch.tensor(sum(seqs, [])), slots, [0, 0, 0], [len(s) for s in seqs], []), cache,
                    "all").logits
    off = 0
    for s in seqs:
        torch.testing.assert_close(out[off:off + len(s)], m.logits(s), atol=atol, rtol=0)
        off += len(s)
    step = m.forward(Batch(torch.tensor([11, 12, 13, 14]), slots, [9, 3, 12], [1, 1, 2], []), cache, "last").logits
    torch.testing.assert_close(step[0], m.logits(seqs[0] + [11])[-1], atol=atol, rtol=0)
    torch.testing.assert_close(step[1], m.logits(seqs[1] + [12])[-1], atol=atol, rtol=0)
    torch.testing.assert_close(step[2], m.logits(seqs[2] + [13, 14])[-1], atol=atol, rtol=0)


def check_chunks_beside_another(m, cache, seq: list[int], slot: int, pos: int, steps: list[int],
                                other: list[int], other_slot: int) -> None:
    """Feed `seq[pos:]` into `slot` in chunks of `steps` tokens while `other` (already in `other_slot`)
    decodes one token per step in the same batch: every step's logits equal recomputing the prefix."""
    from modeling import Batch

    for n in steps:
        out = m.forward(Batch(torch.tensor(seq[pos:pos + n] + [31]), [slot, other_slot], [pos, len(other)], [n, 1],
                              []), cache, "last").logits
        other.append(31)
        pos += n
        torch.testing.assert_close(out[0], m.logits(seq[:pos])[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], m.logits(other)[-1], atol=1e-5, rtol=0)
    assert pos == len(seq) and cache.lengths[slot] == len(seq)
