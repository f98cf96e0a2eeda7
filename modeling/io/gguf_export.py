"""A checkpoint (a profile, above all) as one GGUF file that llama.cpp and ollama run.

Uses the `gguf` package that llama.cpp maintains: its tensor-name map
(`gguf.get_tensor_name_map`) turns Hugging Face names into llama.cpp's
(`blk.N.ffn_gate_exps.weight`, ...) and its writer lays the file out. What is
ours: reading the checkpoint through `modeling.io.weights` (so either expert
layout works), stacking a layer's experts into the 3-D tensors llama.cpp
expects, the metadata of each architecture, and the tokenizer read from
`tokenizer.json` without transformers. Tensors stream to the file one at a
time (a layer's stacked experts are the largest copy made).

Families and llama.cpp architectures: olmoe -> `olmoe`, qwen3_moe ->
`qwen3moe`, mixtral -> `llama` (q/k rows permuted to llama.cpp's interleaved
RoPE, as its converter does), glm4_moe -> `glm4moe`, deepseek_v3 and
glm4_moe_lite -> `deepseek2` (MLA as llama.cpp's converter writes it:
`kv_b_proj` split into per-head `attn_k_b` (transposed) and `attn_v_b`, the
`*_mla` key/value lengths; block-scaled FP8 weights are written dequantized to
bfloat16, llama.cpp having no such type), qwen3_next -> `qwen3next` and
qwen3_5_moe -> `qwen35moe` (Gated DeltaNet layers as llama.cpp's converter
writes them: `-exp(A_log)`, the conv kernel squeezed to 2-D, zero-centred norms
stored as 1 + w, Qwen3-Next's fused `in_proj_qkvz` regrouped into `attn_qkv` +
`attn_gate`, Qwen3.5's value heads reordered from grouped-by-key-head to tiled;
the vision tower and MTP layers are not in profiles and not written). llama.cpp
keeps one expert count per model, so only profiles with the same count in every
MoE layer export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig, load_config
from ..layers.gated_deltanet import DeltaNetShape
from ..quant.fp8 import Fp8Matrix
from ..names import EXPERT_PARTS
from .safetensors_io import CheckpointFiles
from .weights import ModelWeights, read_weights


class ExportError(ValueError):
    """A checkpoint that llama.cpp cannot represent, or a broken tokenizer."""


# llama.cpp's pre-tokenizer name per architecture, for the families' released tokenizers
# (llama.cpp identifies it by hashing a tokenization, which needs transformers; ours is a default).
DEFAULT_PRE = {"qwen3moe": "qwen2", "olmoe": "olmo", "glm4moe": "glm4", "llama": "default", "deepseek2": "default",
               "qwen3next": "qwen2", "qwen35moe": "qwen35"}
# architectures whose dense layers lead (first_k_dense_replace) and whose MoE has a shared-expert MLP
_LEADING_DENSE = ("glm4moe", "deepseek2")
# Gated DeltaNet + gated attention, a sigmoid-gated shared expert (llama.cpp's qwen3next.cpp / qwen35moe.cpp)
_HYBRID = ("qwen3next", "qwen35moe")
# Qwen3.5's interleaved MRoPE sections (llama.cpp requires the key; its converter's default when the
# config has none). Text positions are equal in every section, so text runs as plain partial RoPE.
_QWEN35_MROPE_SECTIONS = [11, 11, 10, 0]


@dataclass
class _Item:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], Tensor]


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency of the project
        raise ExportError("the `gguf` package is not installed (pip install gguf)") from None
    return gguf


def _arch(gguf, name: str):
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _check(cfg: ModelConfig) -> tuple[str, int]:
    fam = cfg.family
    if fam.gguf_arch is None:
        from ..families import FAMILIES

        ok = ", ".join(m for m, f in FAMILIES.items() if f.gguf_arch)
        raise ExportError(f"{cfg.source}: llama.cpp has no architecture for model_type {cfg.model_type!r}; "
                          f"GGUF export supports {ok}")
    if fam.gguf_arch in _HYBRID:
        s: DeltaNetShape = cfg.extra["deltanet"]
        if s.head_k_dim != s.head_v_dim:
            # llama.cpp sizes both from one key (ssm.state_size)
            raise ExportError(f"{cfg.source}: Gated DeltaNet with key head size {s.head_k_dim} != value head size "
                              f"{s.head_v_dim} is not exported: llama.cpp's {fam.gguf_arch} holds one head size")
        if fam.gguf_arch == "qwen35moe" and sum(_mrope_sections(cfg)) > cfg.head_dim:
            # ggml's multi-section RoPE asserts it (real Qwen3.5: 32 pairs in sections, head_dim 256)
            raise ExportError(f"{cfg.source}: MRoPE sections {_mrope_sections(cfg)} cover more than head_dim "
                              f"{cfg.head_dim}; llama.cpp's qwen35moe cannot run such a file")
        if not cfg.routing.renormalise:
            raise ExportError(f"{cfg.source}: norm_topk_prob false is not exported: llama.cpp's {fam.gguf_arch} "
                              f"always renormalises the top-k weights")
    moe = sorted({e for e in cfg.experts_per_layer if e})
    if len(moe) != 1:
        raise ExportError(f"{cfg.source}: MoE layers keep different expert counts {moe}; llama.cpp holds one count "
                          f"per model (build the profile with the same --keep in every layer)")
    dense = [i for i, e in enumerate(cfg.experts_per_layer) if e == 0]
    if fam.gguf_arch in _LEADING_DENSE:
        if dense != list(range(len(dense))):
            raise ExportError(f"{cfg.source}: dense layers {dense} are not the leading layers llama.cpp's glm4moe expects")
    elif dense:
        raise ExportError(f"{cfg.source}: layers {dense} are dense; llama.cpp's {fam.gguf_arch} has MoE layers only")
    if fam.gguf_arch == "olmoe" and cfg.num_kv_heads != cfg.num_heads:
        # llama.cpp's olmoe builds attn_k_norm with n_embd values (OLMoE's own checkpoints have as many
        # kv heads as query heads); a GQA one would be written but refused at load ("wrong shape")
        raise ExportError(f"{cfg.source}: OLMoE with grouped-query attention ({cfg.num_kv_heads} kv heads for "
                          f"{cfg.num_heads} query heads) is not exported: llama.cpp's olmoe normalises keys over "
                          f"the full width")
    if cfg.routing.n_group > 1:
        raise ExportError(f"{cfg.source}: group-limited routing (n_group {cfg.routing.n_group}) is not exported")
    if any(cfg.always_active_per_layer) or any(cfg.shared_per_layer):
        raise ExportError(f"{cfg.source}: shared or always-active router slots have no llama.cpp equivalent")
    if cfg.rope.type != "default":
        raise ExportError(f"{cfg.source}: RoPE type {cfg.rope.type!r} is not exported")
    if cfg.o_bias and fam.gguf_arch in ("qwen3moe", *_HYBRID):
        # llama.cpp loads q/k/v biases there but no attention output bias: the file would be refused at load
        # ("wrong number of tensors")
        raise ExportError(f"{cfg.source}: attention biases (attention_bias true) are not exported: llama.cpp's "
                          f"{fam.gguf_arch} has no attention output bias")
    if fam.gguf_arch == "deepseek2":
        if not cfg.extra["mla"]["rope_interleave"]:
            raise ExportError(f"{cfg.source}: MLA with rope_interleave false (rotate-half RoPE) is not exported: "
                              f"llama.cpp's deepseek2 rotates interleaved pairs")
        if cfg.attention_bias:
            raise ExportError(f"{cfg.source}: MLA with attention biases is not exported: llama.cpp's deepseek2 "
                              f"has no attention bias tensors")
    return fam.gguf_arch, moe[0]


def _permute_for_llama(w: Tensor, heads: int) -> Tensor:
    """HF's rotate-half rows -> llama.cpp's interleaved pairs (what its llama converter does to q/k)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _items(cfg: ModelConfig, w: ModelWeights, gguf, arch_name: str) -> Iterator[_Item]:
    n = cfg.names
    tmap = gguf.get_tensor_name_map(_arch(gguf, arch_name), cfg.num_layers)

    def gname(hf: str) -> str:
        if n.prefix != "model" and hf.startswith(f"{n.prefix}."):  # Qwen3.5's model.language_model.*
            hf = "model." + hf[len(n.prefix) + 1:]
        g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ExportError(f"llama.cpp's {arch_name} has no tensor for {hf!r}")
        return g

    def item(hf: str, t, f32: bool = False, fn: Callable[[Tensor], Tensor] | None = None) -> _Item:
        if isinstance(t, Fp8Matrix):  # dequantized when written (one matrix at a time)
            return _Item(gname(hf), t.shape, torch.bfloat16, lambda: _plain(t))
        dt = torch.float32 if f32 or t.dim() == 1 else t.dtype  # norms, biases and routers stay float32
        return _Item(gname(hf), tuple(t.shape), dt, lambda: (fn(t) if fn else t).to(dt))

    def norm(hf: str, t: Tensor) -> _Item:
        # zero-centred RMSNorm weights (the model scales by 1 + w): llama.cpp's norm multiplies by the weight
        return item(hf, t, f32=True, fn=(lambda x: x.float() + 1) if cfg.norm_offset else None)

    llama = arch_name == "llama"
    yield item(n.embed, w.embed)
    for i, lw in enumerate(w.layers):
        yield norm(n.attn_norm(i), lw.attn_norm)
        # the attention module's own tensors, by checkpoint name; llama's q/k rows are permuted
        rotated = {n.proj(i, "q"): cfg.num_heads, n.proj(i, "k"): cfg.num_kv_heads,
                   n.proj(i, "q", "bias"): cfg.num_heads, n.proj(i, "k", "bias"): cfg.num_kv_heads}
        if cfg.layer_types[i] == "linear_attention":
            yield from _deltanet_items(cfg, i, lw.attn, gname, tiled=arch_name == "qwen35moe")
        else:
            for name, t in lw.attn.named_tensors():
                if arch_name == "deepseek2" and name == n.mla(i, "kv_b_proj"):
                    yield from _mla_kv_b(cfg, i, t, gname)
                elif name.endswith("norm.weight"):  # q/k norms
                    yield norm(name, t)
                else:
                    heads = rotated.get(name) if llama else None
                    yield item(name, t, fn=(lambda x, h=heads: _permute_for_llama(x, h)) if heads else None)
        yield norm(n.mlp_norm(i), lw.mlp_norm)
        yield from _mlp_items(cfg, i, lw, gname, item)
    yield norm(n.final_norm, w.final_norm)
    if w.lm_head is not w.embed:
        yield item(n.lm_head, w.lm_head)


def _mlp_items(cfg: ModelConfig, i: int, lw, gname, item) -> Iterator[_Item]:
    """A layer's MLP: a dense one, or router, stacked experts and the shared expert (with its gate)."""
    n = cfg.names
    if lw.experts is None:
        for p, t in zip(EXPERT_PARTS, lw.dense.matrices()):
            yield item(n.dense(i, p), t)
        return
    le = lw.experts
    yield item(n.router(i), le.router, f32=True)
    if le.bias is not None:
        yield item(f"{n.layer(i)}.mlp.gate.e_score_correction.bias", le.bias)
    for k, (part, hf_part) in enumerate(zip(EXPERT_PARTS, n.expert_parts)):
        first = le.experts[0].matrices()[k]
        merged = f"{n.layer(i)}.{n.moe_module}.experts.{hf_part}.weight"
        dt = torch.bfloat16 if isinstance(first, Fp8Matrix) else first.dtype
        yield _Item(gname(merged), (len(le.experts), *first.shape), dt,
                    lambda k=k, le=le: torch.stack([_plain(e.matrices()[k]) for e in le.experts]))
    if lw.shared_mlp is not None:
        for p, t in zip(EXPERT_PARTS, lw.shared_mlp.matrices()):
            yield item(n.shared(i, p), t)
    if lw.shared_gate is not None:  # [1, H] as stored (llama.cpp reads {n_embd}); float32 like the router
        yield item(n.shared_gate(i), lw.shared_gate, f32=True)


def _deltanet_items(cfg: ModelConfig, i: int, attn, gname, tiled: bool) -> Iterator[_Item]:
    """One Gated DeltaNet layer as llama.cpp's converter writes it (names by the `model.layers.N.linear_attn.*`
    form its tensor map knows). Qwen3-Next's fused projections become attn_qkv (q, k, v of all heads, each
    block contiguous) + attn_gate (z) and ssm_ba as stored; Qwen3.5 (`tiled`) keeps four projections but
    llama.cpp broadcasts key heads over value heads tiled ([k0, k1, k0, k1]) where the checkpoint groups them
    ([k0, k0, k1, k1]), so every value-head axis is reordered. A_log -> -exp(A_log) (ssm_a), dt_bias ->
    ssm_dt.bias, the conv kernel `[C, 1, K]` squeezed to `[C, K]`; small tensors and the conv stay float32."""
    s: DeltaNetShape = cfg.extra["deltanet"]
    H, nk, dk, dv = cfg.hidden_size, s.num_k_heads, s.head_k_dim, s.head_v_dim
    r = s.num_v_heads // nk
    hf = f"model.layers.{i}.linear_attn"

    def tile(t: Tensor, head: int, dim: int = 0) -> Tensor:
        """Value heads along `dim` (`head` wide each) from grouped-by-key-head to tiled order."""
        if not tiled or r == 1:
            return t
        t = t.movedim(dim, 0)
        rest = t.shape[1:]
        return t.reshape(nk, r, head, *rest).transpose(0, 1).reshape(nk * r * head, *rest).movedim(0, dim)

    def out(name: str, shape: tuple[int, ...], dt: torch.dtype, make: Callable[[], Tensor]) -> _Item:
        return _Item(gname(f"{hf}.{name}"), shape, dt, lambda: make().to(dt).contiguous())

    def dtype(t) -> torch.dtype:
        return torch.bfloat16 if isinstance(t, Fp8Matrix) else t.dtype

    if attn.qkvz is not None:  # Qwen3-Next: per key head [q dk, k dk, v r*dv, z r*dv] rows
        qkvz = attn.qkvz

        def split() -> tuple[Tensor, Tensor]:
            q, k, v, z = _plain(qkvz).view(nk, 2 * dk + 2 * r * dv, H).split([dk, dk, r * dv, r * dv], dim=1)
            return torch.cat([q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)]), z.reshape(-1, H)

        yield out("in_proj_qkv.weight", (s.conv_dim, H), dtype(qkvz), lambda: split()[0])
        yield out("in_proj_z.weight", (s.value_dim, H), dtype(qkvz), lambda: split()[1])
        yield out("in_proj_ba.weight", (2 * s.num_v_heads, H), dtype(attn.ba), lambda: _plain(attn.ba))
    else:  # Qwen3.5: q|k|v rows (v's heads reordered), z, b, a
        qkv = attn.qkv

        def qkv_rows() -> Tensor:
            q_k, v = _plain(qkv).split([2 * s.key_dim, s.value_dim])
            return torch.cat([q_k, tile(v, dv)])

        yield out("in_proj_qkv.weight", (s.conv_dim, H), dtype(qkv), qkv_rows)
        yield out("in_proj_z.weight", (s.value_dim, H), dtype(attn.z), lambda: tile(_plain(attn.z), dv))
        for part, t in (("in_proj_b.weight", attn.b), ("in_proj_a.weight", attn.a)):
            yield out(part, (s.num_v_heads, H), dtype(t), lambda t=t: tile(_plain(t), 1))

    def conv() -> Tensor:  # [C, 1, K] -> [C, K]; the channels are q | k | v, v's heads reordered
        c = attn.conv.squeeze(1)
        return torch.cat([c[:2 * s.key_dim], tile(c[2 * s.key_dim:], dv)])

    yield out("conv1d.weight", (s.conv_dim, s.conv_kernel), torch.float32, conv)
    yield out("dt_proj.bias", (s.num_v_heads,), torch.float32, lambda: tile(attn.dt_bias.float(), 1))
    yield out("A_log", (s.num_v_heads,), torch.float32, lambda: tile(-torch.exp(attn.A_log.float()), 1))
    yield out("norm.weight", (dv,), torch.float32, lambda: attn.norm)  # the gated norm is not zero-centred
    yield out("out_proj.weight", (H, s.value_dim), dtype(attn.out), lambda: tile(_plain(attn.out), dv, dim=1))


def _plain(t) -> Tensor:
    """A weight as a plain tensor: block-scaled FP8 dequantized to bfloat16 (llama.cpp has no such type)."""
    return t.dequantize(torch.bfloat16) if isinstance(t, Fp8Matrix) else t


def _mla_kv_b(cfg: ModelConfig, i: int, kv_b, gname) -> Iterator[_Item]:
    """llama.cpp's deepseek2 takes MLA's kv_b_proj `[heads * (nope + v), kv_rank]` as two tensors, as its
    converter writes them: attn_k_b `[heads, kv_rank, nope]` (the key half, transposed) and attn_v_b
    `[heads, v, kv_rank]`."""
    m, n = cfg.extra["mla"], cfg.names
    H, nope, v, r = cfg.num_heads, m["qk_nope_head_dim"], m["v_head_dim"], m["kv_lora_rank"]

    def halves() -> tuple[Tensor, Tensor]:
        k_b, v_b = _plain(kv_b).view(H, nope + v, r).split([nope, v], dim=1)
        return k_b.transpose(1, 2), v_b

    dt = torch.bfloat16 if isinstance(kv_b, Fp8Matrix) else kv_b.dtype
    yield _Item(gname(f"{n.layer(i)}.self_attn.k_b_proj.weight"), (H, r, nope), dt, lambda: halves()[0])
    yield _Item(gname(f"{n.layer(i)}.self_attn.v_b_proj.weight"), (H, v, r), dt, lambda: halves()[1])


_RAW = {torch.float32: (np.float32, None), torch.float16: (np.float16, None), torch.bfloat16: (np.int16, "BF16")}


def _numpy(t: Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


# -- tokenizer ---------------------------------------------------------------------


def _add_tokenizer(writer, gguf, folder: Path, cfg: ModelConfig, arch_name: str, pre: str | None) -> None:
    f = folder / "tokenizer.json"
    if not f.is_file():
        raise ExportError(f"{folder}: no tokenizer.json (llama.cpp needs the tokenizer inside the GGUF file)")
    try:
        tok = json.loads(f.read_text(encoding="utf-8"))
        model = tok["model"]
        if model.get("type") != "BPE":
            raise ExportError(f"{f}: tokenizer model {model.get('type')!r} is not exported (BPE only)")
        vocab: dict[str, int] = dict(model["vocab"])
        added = {int(a["id"]): a for a in tok.get("added_tokens") or []}
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{f}: not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    byte_level = "ByteLevel" in json.dumps(tok.get("pre_tokenizer")) or "ByteLevel" in json.dumps(tok.get("decoder"))
    TT = gguf.TokenType
    size = max(cfg.vocab_size, max(vocab.values(), default=-1) + 1, max(added, default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TT.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = TT.BYTE if (not byte_level and len(text) == 6 and text.startswith("<0x")) else TT.NORMAL
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = TT.CONTROL if a.get("special") else TT.USER_DEFINED
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or DEFAULT_PRE.get(arch_name, "default"))
    else:  # sentencepiece-style BPE with byte fallback (Mixtral's tokenizer.json)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_scores([-float(i) for i in range(size)])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=byte_level, n_vocab=size)
    special.add_to_gguf(writer, quiet=True)
    if cfg.eos_token_ids and "eos" not in special.special_token_ids:
        writer.add_eos_token_id(cfg.eos_token_ids[0])


# -- metadata -----------------------------------------------------------------------


def _add_metadata(writer, gguf, cfg: ModelConfig, arch_name: str, experts: int, name: str, file_type: int) -> None:
    writer.add_name(name)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.dense_intermediate_size or cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    if arch_name == "deepseek2":  # MLA as llama.cpp holds it: one latent "kv head", k = latent + rope
        m = cfg.extra["mla"]
        writer.add_head_count_kv(1)
        writer.add_key_length(m["kv_lora_rank"] + m["qk_rope_head_dim"])
        writer.add_value_length(m["kv_lora_rank"])
        writer.add_key_length_mla(m["qk_nope_head_dim"] + m["qk_rope_head_dim"])
        writer.add_value_length_mla(m["v_head_dim"])
        if m["q_lora_rank"] is not None:
            writer.add_q_lora_rank(m["q_lora_rank"])
        writer.add_kv_lora_rank(m["kv_lora_rank"])
        writer.add_rope_dimension_count(m["qk_rope_head_dim"])
    else:
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.rope.rotary_dim(cfg.head_dim))
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(cfg.top_k)
    writer.add_expert_feed_forward_length(cfg.intermediate_size)
    if arch_name in _HYBRID:
        _add_hybrid_metadata(writer, cfg, arch_name)
    writer.add_expert_weights_norm(bool(cfg.routing.renormalise))
    writer.add_file_type(file_type)
    if cfg.clip_qkv is not None:
        writer.add_clamp_kqv(cfg.clip_qkv)
    if arch_name in _LEADING_DENSE:
        writer.add_leading_dense_block_count(sum(1 for e in cfg.experts_per_layer if e == 0))
        writer.add_expert_shared_count(cfg.shared_mlp_size // cfg.intermediate_size if cfg.intermediate_size else 0)
        writer.add_expert_weights_scale(cfg.routing.scaling)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        if arch_name == "glm4moe":
            writer.add_nextn_predict_layers(0)  # profiles leave the multi-token-prediction layer out


def _add_hybrid_metadata(writer, cfg: ModelConfig, arch_name: str) -> None:
    """Qwen3-Next / Qwen3.5: the Gated DeltaNet sizes under llama.cpp's ssm.* keys (state size = the
    head size of keys and values, group count = key heads, time-step rank = value heads), which layers
    are recurrent, and the shared expert's width."""
    s: DeltaNetShape = cfg.extra["deltanet"]
    writer.add_expert_shared_feed_forward_length(cfg.shared_mlp_size)
    writer.add_ssm_conv_kernel(s.conv_kernel)
    writer.add_ssm_state_size(s.head_k_dim)
    writer.add_ssm_group_count(s.num_k_heads)
    writer.add_ssm_time_step_rank(s.num_v_heads)
    writer.add_ssm_inner_size(s.value_dim)
    recurrent = [t == "linear_attention" for t in cfg.layer_types]
    # the explicit per-layer list (llama.cpp's `attention.recurrent_layers`, read before the interval)
    writer.add_array(f"{arch_name}.attention.recurrent_layers", recurrent)
    full = [i for i, r in enumerate(recurrent) if not r]
    writer.add_full_attention_interval(full[0] + 1 if full else cfg.num_layers + 1)
    if arch_name == "qwen35moe":
        writer.add_rope_dimension_sections(_mrope_sections(cfg))


def _mrope_sections(cfg: ModelConfig) -> list[int]:
    sections = list(cfg.rope.params.get("mrope_section") or _QWEN35_MROPE_SECTIONS)
    return (sections + [0] * 4)[:4]


def export_gguf(folder: str | Path, out: str | Path, *, name: str | None = None, tokenizer_pre: str | None = None,
                force: bool = False, progress: bool = False) -> dict:
    """Write `folder` (a checkpoint or profile) as the GGUF file `out`; returns a summary.
    The file is written under a temporary name and renamed when complete."""
    gguf = _gguf()
    folder, out = Path(folder), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    cfg = load_config(folder)
    arch_name, experts = _check(cfg)
    files = CheckpointFiles(folder)
    stored = files.info(cfg.names.embed).dtype if cfg.names.embed in files else torch.float32
    w = read_weights(folder, files, cfg, stored, torch.device("cpu"))
    items = list(_items(cfg, w, gguf, arch_name))
    ftype = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
             torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}.get(stored, gguf.LlamaFileType.ALL_F32)
    writer = gguf.GGUFWriter(None, arch_name)
    _add_metadata(writer, gguf, cfg, arch_name, experts, name or folder.name, int(ftype))
    _add_tokenizer(writer, gguf, folder, cfg, arch_name, tokenizer_pre)
    for it in items:
        np_dtype, raw = _RAW[it.dtype]
        nbytes = int(np.prod(it.shape)) * torch.tensor([], dtype=it.dtype).element_size()
        writer.add_tensor_info(it.name, it.shape, np.dtype(np_dtype), nbytes,
                               raw_dtype=getattr(gguf.GGMLQuantizationType, raw) if raw else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = 0
        for it in items:
            arr = _numpy(it.make())
            writer.write_tensor_data(arr)
            total += arr.nbytes
            files.release()  # the source pages this tensor came from
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"gguf": str(out), "architecture": arch_name, "tensors": len(items), "expert_count": experts,
            "expert_used_count": cfg.top_k, "bytes": out.stat().st_size, "tensor_bytes": total}
