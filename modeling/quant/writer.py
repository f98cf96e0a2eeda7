"""`quantize_checkpoint`: a whole checkpoint (or profile) rewritten with its linear
weights in the compressed-tensors pack-quantized layout.

Streamed like the profile writer: tensors are views of the mapped source,
quantized one matrix at a time as the shards are written, and the source pages
of each written shard are dropped, so a model larger than memory quantizes
with one shard's worth resident. Written atomically (nothing half-written
under the final name on any error).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from torch import Tensor

from ..config import load_config
from ..io.profile import ProfileManifest, file_hashes
from ..io.safetensors_io import CheckpointFiles, write_checkpoint
from ..io.weights import PROFILE_FILE
from ..names import TensorNames
from .quantize import check_config, ignore_list, is_quantized_linear, quantize_matrix
from .scheme import QuantizationError, WeightScheme

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "kept_experts.json")


def _layer_order(names: TensorNames, name: str) -> tuple[int, str]:
    i = names.layer_of(name)
    if i is not None:
        return i, name
    return (-1 if "embed" in name else 1 << 30), name


def quantize_checkpoint(src: str | Path, out: str | Path, scheme: WeightScheme, *, lm_head: bool = False,
                        max_shard_bytes: int = 2 * 1000**3, force: bool = False, on_progress=None) -> dict:
    """Write `out`: `src` with its linear weights quantized by `scheme`. Returns a summary."""
    src = Path(src)
    cfg = load_config(src)
    if cfg.raw.get("quantization_config") is not None:
        raise QuantizationError(f"{src}: the checkpoint is already quantized")
    check_config(cfg, scheme)
    files = CheckpointFiles(src)
    names = cfg.names
    fused = [n for n in files.names() if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    if fused:
        raise QuantizationError(f"{src}: experts stored fused ({fused[0]!r}); write a profile keeping every expert "
                                f"with `emo-subset build --quantize` instead (it writes experts one by one)")
    sources: dict[str, str] = {}
    stats = {"quantized": 0, "kept": 0, "bytes_in": 0, "bytes_out": 0}

    def stream() -> Iterator[tuple[str, Tensor]]:
        for name in sorted(files.names(), key=lambda x: _layer_order(names, x)):
            t = files.get(name)
            stats["bytes_in"] += t.numel() * t.element_size()
            if is_quantized_linear(name, names, lm_head):
                pieces = quantize_matrix(name, t, scheme)
                stats["quantized"] += 1
            else:
                pieces = [(name, t)]
                stats["kept"] += 1
            for o, x in pieces:
                sources[o] = name
                stats["bytes_out"] += x.numel() * x.element_size()
                yield o, x

    def on_flush(written: list[str]) -> None:
        done = sorted({sources[o] for o in written})
        files.release(done)
        if on_progress is not None:
            on_progress(sum(files.info(s).nbytes for s in done))

    def finish(tmp: Path, hashes: dict[str, str]) -> None:
        if (src / PROFILE_FILE).is_file():  # a profile stays a profile: its manifest with the new hashes
            m = ProfileManifest.read(src)
            m.shards = hashes
            m.bytes = {**(m.bytes or {}), "total": stats["bytes_out"]}
            m.files = file_hashes(tmp, exclude=set(hashes))
            m.write(tmp)
        load_config(tmp)  # what we wrote must parse
        CheckpointFiles(tmp)

    config = json.loads(json.dumps(cfg.raw))
    config["quantization_config"] = scheme.quantization_config(ignore_list(names, lm_head))
    extra = {f: src / f for f in COPIED_FILES if (src / f).is_file()}
    written = write_checkpoint(out, config, stream(), extra_files=extra, max_shard_bytes=max_shard_bytes,
                               force=force, on_flush=on_flush, finish=finish)
    return {"out": str(written.path), "scheme": scheme.describe(), "shards": written.shard_sha256,
            "bytes": written.total_bytes, **stats}
