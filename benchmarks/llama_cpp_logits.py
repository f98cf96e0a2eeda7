"""llama.cpp's logits on our GGUF exports, against emo-serve's, per family (issue 9).

For each family llama.cpp knows (olmoe, qwen3_moe, mixtral, glm4_moe), writes a
tiny float32 checkpoint with transformers (as the tests do), builds a uniform
profile with `emo-subset build --experts-file`, exports it with `emo-subset
export-gguf`, runs the GGUF through llama.cpp (its C library, through the
ctypes bindings of the llama-cpp-python source package) and compares every
position's logits with `load_model(profile).logits`. Prints the largest absolute
difference and how often the argmax agrees.

Needs a llama.cpp built with shared libraries (benchmarks/build_llama_cpp.sh)
and the matching llama-cpp-python source tree:

    python benchmarks/llama_cpp_logits.py --lib /work/llama-build/llama.cpp/build/bin \\
        --bindings /work/llama-build/src/llama_cpp_python-0.3.36
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IDS = [5, 17, 42, 3, 99, 250, 7, 64, 128, 31, 2, 200, 11, 12, 13, 14]
CASES = {  # family -> (config overrides, kept experts per MoE layer)
    "olmoe": ({"num_key_value_heads": 4}, {0: [1, 2, 3, 4], 1: [0, 5, 6, 7], 2: [2, 3, 6, 7]}),
    "qwen3_moe": ({"mlp_only_layers": [], "attention_bias": False}, {i: [0, 2, 5, 7] for i in range(3)}),
    "mixtral": ({}, {0: [0, 2, 5, 6], 1: [1, 3, 4, 7], 2: [2, 3, 5, 7]}),
    "glm4_moe-air": ({}, {1: [0, 2, 4, 6], 2: [1, 3, 5, 7]}),
}


def llama_logits(llama_cpp, gguf_path: Path, ids: list[int]):
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, n_batch=64, logits_all=True, verbose=bool(os.environ.get("LLAMA_VERBOSE")),
                          n_threads=1)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", required=True, help="folder holding libllama.so")
    ap.add_argument("--bindings", required=True, help="llama-cpp-python source tree (holds llama_cpp/)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    os.environ["LLAMA_CPP_LIB_PATH"] = args.lib
    sys.path.insert(0, args.bindings)
    import llama_cpp
    import numpy as np
    import torch

    from modeling import load_model
    from subsetting.cli import main as subset
    from tests.checkpoints import write_tokenizer
    from tests.families import write_hf_checkpoint

    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (name, (over, kept)) in enumerate(CASES.items()):
            base = root / name
            write_hf_checkpoint(base, name, seed=40 + i, **over)
            write_tokenizer(base, 300)
            ef = root / f"{name}.json"
            ef.write_text(json.dumps({str(k): v for k, v in kept.items()}))
            prof, gg = root / f"{name}-profile", root / f"{name}.gguf"
            assert subset(["build", str(base), "--out", str(prof), "--experts-file", str(ef), "-q"]) == 0
            assert subset(["export-gguf", str(prof), "--out", str(gg), "-q"]) == 0
            ours = load_model(prof).logits(IDS).double().numpy()
            theirs = llama_logits(llama_cpp, gg, IDS)
            diff = float(np.abs(ours - theirs).max())
            agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
            rows[name] = {"max_abs_diff": diff, "argmax_agreement": agree, "logit_scale": float(np.abs(ours).max())}
            print(f"{name:14s} max |ours - llama.cpp| = {diff:.2e} (logits up to {rows[name]['logit_scale']:.2f}), "
                  f"argmax agrees at {agree:.0%} of {len(IDS)} positions")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
