"""Tiny real checkpoints for the tests, written with the `safetensors` library
itself (not our writer), so reading them exercises our reader against the
reference implementation of the format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    "The quick brown fox jumps over the lazy dog. A licence grants permission to copy.\n"
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 1 + 2); return 0; }\n"
    "12 + 30 = 42; 7 * 6 = 42; 100 - 58 = 42.\n"
) * 4


def emo_config(**over) -> dict:
    cfg = {
        "model_type": "emo",
        "architectures": ["EmoForCausalLM"],
        "vocab_size": 320,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "intermediate_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "num_shared_experts": 1,
        "norm_topk_prob": False,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }
    cfg.update(over)
    return cfg


def random_tensors(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32, fused: bool = False) -> dict:
    """Every tensor an EMO/OLMoE config calls for, random, with docs/formats.md names."""
    g = torch.Generator().manual_seed(seed)
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kvh = cfg.get("num_key_value_heads", heads)
    D = cfg.get("head_dim", H // heads)
    I = cfg.get("intermediate_size", 0)
    olmoe = cfg["model_type"] == "olmoe"
    experts = cfg.get("num_experts_per_layer") or [cfg["num_experts"]] * L

    def r(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    t = {"model.embed_tokens.weight": r(V, H, scale=1.0), "model.norm.weight": 1 + r(H, scale=0.1),
         "lm_head.weight": r(V, H)}
    for i in range(L):
        p = f"model.layers.{i}"
        an, mn = ("input_layernorm", "post_attention_layernorm") if olmoe else ("pre_attention_layernorm", "pre_feedforward_layernorm")
        t[f"{p}.{an}.weight"] = 1 + r(H, scale=0.1)
        t[f"{p}.{mn}.weight"] = 1 + r(H, scale=0.1)
        t[f"{p}.self_attn.q_proj.weight"] = r(heads * D, H)
        t[f"{p}.self_attn.k_proj.weight"] = r(kvh * D, H)
        t[f"{p}.self_attn.v_proj.weight"] = r(kvh * D, H)
        t[f"{p}.self_attn.o_proj.weight"] = r(H, heads * D)
        if olmoe:
            t[f"{p}.self_attn.q_norm.weight"] = 1 + r(heads * D, scale=0.1)
            t[f"{p}.self_attn.k_norm.weight"] = 1 + r(kvh * D, scale=0.1)
        E = experts[i]
        if E == 0:
            Dn = cfg["dense_intermediate_size"]
            t[f"{p}.mlp.gate_proj.weight"] = r(Dn, H)
            t[f"{p}.mlp.up_proj.weight"] = r(Dn, H)
            t[f"{p}.mlp.down_proj.weight"] = r(H, Dn)
            if cfg.get("dense_mlp_bias"):
                t[f"{p}.mlp.gate_proj.bias"] = r(Dn)
                t[f"{p}.mlp.up_proj.bias"] = r(Dn)
                t[f"{p}.mlp.down_proj.bias"] = r(H)
            continue
        t[f"{p}.mlp.gate.weight"] = r(E, H, scale=1.0)
        if fused:
            t[f"{p}.mlp.experts.gate_up_proj"] = r(E, 2 * I, H)
            t[f"{p}.mlp.experts.down_proj"] = r(E, H, I)
        else:
            for j in range(E):
                t[f"{p}.mlp.experts.{j}.gate_proj.weight"] = r(I, H)
                t[f"{p}.mlp.experts.{j}.up_proj.weight"] = r(I, H)
                t[f"{p}.mlp.experts.{j}.down_proj.weight"] = r(H, I)
    return t


def write_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    """A small byte-level BPE tokenizer with <|endoftext|> (id 0) and <|pad|> (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    }))


def write_checkpoint_dir(folder: Path, cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                         fused: bool = False, shards: int = 1, tokenizer: bool = True) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(cfg, seed, dtype, fused)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(tensors)
        per = -(-len(names) // shards)
        wm = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            wm.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if tokenizer:
        write_tokenizer(folder, cfg["vocab_size"])
    return folder


# Two tiny labelled domains: calibration text for profiles built in the tests.
CODE_DOCS = ["def add(a, b):\n    return a + b\n", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
             "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 1 + 2); return 0; }\n"]
PROSE_DOCS = ["The quick brown fox jumps over the lazy dog.", "A licence grants permission to copy.",
              "The lazy dog sleeps; the quick fox jumps over it again."]


def write_domain_corpus(path: Path) -> Path:
    """A .jsonl calibration corpus with the domains "code" and "prose"."""
    with Path(path).open("w") as f:
        for domain, docs in (("code", CODE_DOCS), ("prose", PROSE_DOCS)):
            for d in docs:
                f.write(json.dumps({"text": d, "domain": domain}) + "\n")
    return Path(path)


def lay_out_hub_cache(src: Path, cache: Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """Put checkpoint `src` into a Hugging Face hub cache folder as `repo_id`
    (models--owner--name/snapshots/COMMIT + refs/main), as a download would;
    with HF_HUB_CACHE=cache and HF_HUB_OFFLINE=1 it resolves without network.
    Returns the snapshot folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap
