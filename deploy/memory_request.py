#!/usr/bin/env python3
"""Memory a group of profiles needs: the number that goes into its Deployment.

    python deploy/memory_request.py --max-batch 8 --max-model-len 4096 \
        /data/profiles/code/python /data/profiles/code/c

A server process keeps resident (docs/architecture.md, "Performance model"):

    base       the non-expert weights (embeddings, attention, norms, routers,
               lm_head): every token touches them.
    experts    the experts of the profiles it hosts. emo-serve maps an expert
               that several profiles keep (same layer, same original id) once,
               so a group needs the UNION of its profiles' experts.
    kv cache   2 (K and V) x layers x kv heads x head dim x bytes per value
               x max batch x max model length: the engine's KVCache slots.

request = (base + experts + kv cache) x (1 + headroom) + runtime overhead
(Python, PyTorch, allocator slack), rounded up to a whole GiB; the limit is set
equal to the request, so the pod is never overcommitted on memory. Weights are
memory-mapped: their pages are file-backed and count against the cgroup as
page cache; sizing the request to hold them is what keeps decoding from
re-reading the volume.

Where the numbers come from (profile.json as emo-subset writes it):
  experts: `bytes.experts` of each profile and its `kept_experts` ({layer:
           [original ids]}): per-expert size = bytes / experts kept; the union
           of (layer, id) pairs over the group at that size. Without
           `kept_experts` (or with --per-profile, for a server that would not
           share them) the profiles' expert bytes add up. A plain number in
           `bytes` is read as expert bytes.
  base:    --base-bytes, else the non-expert tensors of --model's safetensors
           (sizes from the JSON headers: nothing is loaded), else the largest
           `bytes.non_expert` of the profiles (each profile is a stand-alone
           checkpoint with the base's non-expert weights).
  kv:      config.json of --model, else of the first profile; values in the dtype
           the server computes in: --dtype, else the checkpoint's stored dtype
           (its embedding tensor's, from the safetensors header), as emo-serve.
  --max-batch and --max-model-len mean what they mean to emo-serve, with its
  defaults (server.config.ServerConfig) and its context-length rule.
A running server reports the same two weight numbers: `non_expert_bytes` and
`profiles_union_expert_bytes` of GET /v1/profiles.

Output: a human summary (default), `--format json`, or `--format k8s`: a
kustomize strategic-merge patch for the emo-serve container's memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

if importlib.util.find_spec("server") is None:  # run as a file from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling.config import load_config  # noqa: E402  (emo-serve's own config parser and cache layout)
from modeling.layers.cache import KVCache  # noqa: E402
from server.config import ServerConfig, context_length  # noqa: E402

SERVER = ServerConfig()  # emo-serve's defaults: one source for both

GIB = 1024**3
MIB = 1024**2
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_CONFIG_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "bfloat16": 2, "fp16": 2, "bf16": 2}
EMBED = "model.embed_tokens.weight"


def parse_size(text: str) -> int:
    """`1073741824`, `1GiB`, `512Mi`, `2G` -> bytes."""
    t = text.strip()
    units = {"ki": 1024, "mi": MIB, "gi": GIB, "ti": 1024**4,
             "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
    low = t.lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if low.endswith(suffix):
            return int(float(low[: -len(suffix)]) * units[suffix])
    return int(float(low))


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def stored_dtype_bytes(folder: Path) -> int | None:
    """Bytes per value of the checkpoint's embedding tensor (the dtype emo-serve computes in
    without --dtype), from the safetensors headers; None if the folder has no such tensor."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        info = _header(f).get(EMBED)
        if info is not None:
            return _DTYPE_BYTES.get(info["dtype"])
    return None


def safetensors_tensors(path: Path) -> dict[str, int]:
    """Tensor name -> bytes, from the JSON header of one .safetensors file."""
    header = _header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = end - start
    return out


def is_expert_tensor(name: str) -> bool:
    # per-expert (`mlp.experts.<j>.`) or fused (`mlp.experts.gate_up_proj`) layouts
    return ".experts." in name or name.endswith(".experts")


def tensor_bytes(folder: Path) -> tuple[int, int] | None:
    """(non-expert bytes, expert bytes) of a folder's safetensors, None if it has none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    base = experts = 0
    for f in files:
        for name, size in safetensors_tensors(f).items():
            if is_expert_tensor(name):
                experts += size
            else:
                base += size
    return base, experts


def kept_experts(profile: dict[str, Any]) -> dict[int, set[int]] | None:
    """Original expert ids kept per layer, from profile.json, if it lists them."""
    for key in ("kept_experts", "experts", "kept", "expert_ids"):
        value = profile.get(key)
        if isinstance(value, dict):
            return {int(k): set(map(int, v)) for k, v in value.items()}
        if isinstance(value, list) and all(isinstance(v, list) for v in value):
            return {i: set(map(int, v)) for i, v in enumerate(value)}
    return None


def profile_bytes(profile: dict[str, Any]) -> tuple[int | None, int | None]:
    """(expert bytes, non-expert bytes) from profile.json's `bytes`."""
    b = profile.get("bytes")
    if isinstance(b, dict):
        experts = b.get("experts")
        non_expert = b.get("non_expert")
        if experts is None and b.get("total") is not None and non_expert is not None:
            experts = int(b["total"]) - int(non_expert)
        return (None if experts is None else int(experts)), (None if non_expert is None else int(non_expert))
    if b is not None:
        return int(b), None
    return None, None


def config_dtype_bytes(config: dict[str, Any]) -> int:
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
    return _CONFIG_DTYPE_BYTES.get(dtype, 2)


def estimate(
    profile_dirs: Iterable[Path],
    *,
    model_dir: Path | None = None,
    base_bytes: int | None = None,
    max_batch: int = SERVER.max_batch,
    max_model_len: int | None = SERVER.max_model_len,
    kv_dtype_bytes: int | None = None,
    dtype: str | None = SERVER.dtype,
    per_profile: bool = False,
    headroom: float = 0.10,
    runtime_overhead: int = GIB,
) -> dict[str, Any]:
    profile_dirs = [Path(p) for p in profile_dirs]
    if not profile_dirs:
        raise ValueError("name at least one profile folder")
    profiles = []
    for d in profile_dirs:
        meta_path = d / "profile.json"
        if not meta_path.is_file():
            raise ValueError(f"{d}: no profile.json")
        meta = json.loads(meta_path.read_text())
        experts, non_expert = profile_bytes(meta)
        source = "profile.json"
        if experts is None:
            shards = tensor_bytes(d)
            if shards is None or shards[1] == 0:
                raise ValueError(f"{d}: profile.json has no `bytes` and the folder no expert shards")
            non_expert, experts = shards
            source = "shards"
        profiles.append({"name": meta.get("name", d.name), "dir": str(d), "expert_bytes": experts,
                         "non_expert_bytes": non_expert, "source": source, "kept": kept_experts(meta)})

    if base_bytes is None:
        if model_dir is not None:
            found = tensor_bytes(Path(model_dir))
            if found is None:
                raise ValueError(f"{model_dir}: no .safetensors files")
            base_bytes = found[0]
        else:
            known = [p["non_expert_bytes"] for p in profiles if p["non_expert_bytes"] is not None]
            if not known:
                raise ValueError("profile.json has no bytes.non_expert: give --base-bytes or --model")
            base_bytes = max(known)

    if not per_profile and all(p["kept"] for p in profiles):
        union: set[tuple[int, int]] = set()
        per_expert = 0.0
        for p in profiles:
            pairs = {(layer, e) for layer, ids in p["kept"].items() for e in ids}
            union |= pairs
            per_expert = max(per_expert, p["expert_bytes"] / max(1, len(pairs)))
        experts_total = int(math.ceil(per_expert * len(union)))
        experts_rule = f"union of {len(union)} (layer, expert) pairs"
    else:
        experts_total = sum(p["expert_bytes"] for p in profiles)
        experts_rule = "sum over profiles"

    # The KV cache as the server's engine allocates it: the model's config read by emo-serve's own
    # parser (every family: layers, kv heads, head dim, sliding windows), emo-serve's context rule.
    weights_dir = Path(model_dir) if model_dir else profile_dirs[0]  # the checkpoint the server runs on
    cfg = load_config(weights_dir)
    if kv_dtype_bytes is None:
        kv_dtype_bytes = (_CONFIG_DTYPE_BYTES[dtype] if dtype else stored_dtype_bytes(weights_dir)) or \
            config_dtype_bytes(cfg.raw)
    max_model_len = context_length(replace(SERVER, max_model_len=max_model_len), cfg.max_position_embeddings)[0]
    per_token = KVCache.nbytes_for(cfg, 1, 1, kv_dtype_bytes)
    kv = KVCache.nbytes_for(cfg, max_batch, max_model_len, kv_dtype_bytes)

    weights_and_cache = base_bytes + experts_total + kv
    total = weights_and_cache * (1 + headroom) + runtime_overhead
    request_gib = int(math.ceil(total / GIB))
    return {
        "profiles": [{k: v for k, v in p.items() if k != "kept"} for p in profiles],
        "base_bytes": base_bytes,
        "experts_bytes": experts_total,
        "experts_rule": experts_rule,
        "kv_bytes_per_token": per_token,
        "max_batch": max_batch,
        "max_model_len": max_model_len,
        "kv_cache_bytes": kv,
        "headroom": headroom,
        "runtime_overhead_bytes": runtime_overhead,
        "total_bytes": int(total),
        "request": f"{request_gib}Gi",
        "limit": f"{request_gib}Gi",
    }


def k8s_patch(result: dict[str, Any], deployment: str = "emo-serve", container: str = "emo-serve") -> str:
    names = ", ".join(p["name"] for p in result["profiles"])
    return (
        f"# Generated by deploy/memory_request.py for profiles: {names}\n"
        f"# base {result['base_bytes']} + experts {result['experts_bytes']} ({result['experts_rule']})"
        f" + kv cache {result['kv_cache_bytes']} ({result['max_batch']} x {result['max_model_len']} tokens),\n"
        f"# x {1 + result['headroom']:.2f} + {result['runtime_overhead_bytes']} runtime = {result['total_bytes']}"
        f" bytes\n"
        "apiVersion: apps/v1\n"
        "kind: Deployment\n"
        "metadata:\n"
        f"  name: {deployment}\n"
        "spec:\n"
        "  template:\n"
        "    spec:\n"
        "      containers:\n"
        f"        - name: {container}\n"
        "          resources:\n"
        "            requests:\n"
        f"              memory: {result['request']}\n"
        "            limits:\n"
        f"              memory: {result['limit']}\n"
    )


def _human(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profiles", nargs="+", type=Path, help="profile folders hosted by one server")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path,
                     help="base model folder, if the server gets --model (non-expert bytes from its safetensors; "
                          "default: none, the profiles' own figures)")
    src.add_argument("--base-bytes", type=parse_size,
                     help="non-expert bytes (default: bytes.non_expert of the profiles)")
    ap.add_argument("--max-batch", type=int, default=SERVER.max_batch,
                    help="emo-serve --max-batch (default %(default)s, emo-serve's)")
    ap.add_argument("--max-model-len", type=int, default=SERVER.max_model_len,
                    help="emo-serve --max-model-len (default: the model's context length, as emo-serve)")
    ap.add_argument("--dtype", choices=sorted(_CONFIG_DTYPE_BYTES), default=SERVER.dtype,
                    help="emo-serve --dtype (default: the checkpoint's stored dtype, as emo-serve)")
    ap.add_argument("--kv-dtype-bytes", type=int, help="bytes per KV value, overriding --dtype "
                    "(default: from --dtype)")
    ap.add_argument("--per-profile", action="store_true",
                    help="add up the profiles' experts instead of counting a shared expert once (default: once, "
                         "as emo-serve maps it)")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction added on top (default %(default)s)")
    ap.add_argument("--runtime-overhead", type=parse_size, default=GIB,
                    help="Python + PyTorch + allocator (default 1GiB)")
    ap.add_argument("--format", choices=("text", "json", "k8s"), default="text",
                    help="text, json or a kustomize patch (default %(default)s)")
    ap.add_argument("--deployment", default="emo-serve", help="Deployment name in the k8s patch "
                    "(default %(default)s)")
    args = ap.parse_args(argv)
    try:
        result = estimate(
            args.profiles, model_dir=args.model, base_bytes=args.base_bytes, max_batch=args.max_batch,
            max_model_len=args.max_model_len, kv_dtype_bytes=args.kv_dtype_bytes, dtype=args.dtype,
            per_profile=args.per_profile, headroom=args.headroom, runtime_overhead=args.runtime_overhead,
        )
    except (ValueError, KeyError, OSError) as exc:  # modeling's ConfigError is a ValueError
        print(f"memory_request: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(result, indent=2))
    elif args.format == "k8s":
        sys.stdout.write(k8s_patch(result, args.deployment))
    else:
        for p in result["profiles"]:
            print(f"profile {p['name']:<14}{_human(p['expert_bytes']):>12}  of experts (from {p['source']})")
        print(f"{'base (non-expert)':<22}{_human(result['base_bytes']):>12}")
        print(f"{'experts':<22}{_human(result['experts_bytes']):>12}  ({result['experts_rule']})")
        print(f"{'kv cache':<22}{_human(result['kv_cache_bytes']):>12}  "
              f"({result['kv_bytes_per_token']} B/token x {result['max_batch']} x {result['max_model_len']})")
        print(f"{'total with headroom':<22}{_human(result['total_bytes']):>12}")
        print(f"{'memory request/limit':<22}{result['request']:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
