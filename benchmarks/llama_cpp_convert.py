"""Convert the model-core benchmark's OLMoE checkpoint to a bf16 GGUF with llama.cpp's own converter.

The checkpoint written by `bench_model.py` (`<dir>/olmoe-4l`) has random weights and no tokenizer, and
llama.cpp's `convert_hf_to_gguf.py` needs one. This helper

  1. builds a staging folder next to the output (never touching the checkpoint): symlinks to the
     checkpoint's config.json, index and shards, plus a small byte-level BPE tokenizer
     (`tokenizer.json` + `tokenizer_config.json`, trained with the `tokenizers` library; the converter
     pads the vocabulary to the config's vocab_size with unused [PADn] entries);
  2. runs the vendored `convert_hf_to_gguf.py` unchanged (`--outtype bf16`), except that a tokenizer the
     converter's table of known pre-tokenizer hashes does not list is declared "gpt-2": that table only
     knows published tokenizers, and a ByteLevel pre-tokenizer with use_regex=True is exactly GPT-2's
     regex, so "gpt-2" is the right pre-tokenizer for this one.

Usage (from the llama.cpp venv, see benchmarks/llama_cpp.md):
  .bench/llama-venv/bin/python benchmarks/llama_cpp_convert.py \
      --llama-cpp .bench/llama.cpp-src/llama_cpp_python-*/vendor/llama.cpp \
      --checkpoint /tmp/emo-bench/olmoe-4l --out .bench/olmoe-4l-bf16.gguf

Never imported by the project or its tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import runpy
import sys
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. Mixture-of-experts models route every token to a few "
        "experts; the rest stay on disk. 0123456789 ,.;:!? () [] {} <> 'quotes' \"double\"\n") * 20


def stage(checkpoint: Path, staging: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    staging.mkdir(parents=True, exist_ok=True)
    for f in sorted(checkpoint.iterdir()):
        if f.name == "config.json" or f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            link = staging / f.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(f.resolve())
    if (staging / "tokenizer.json").is_file():
        return
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(staging / "tokenizer.json"))
    (staging / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "bos_token": None, "add_bos_token": False}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source folder (has convert_hf_to_gguf.py)")
    ap.add_argument("--checkpoint", default="/tmp/emo-bench/olmoe-4l")
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--staging", help="staging folder (default: <out>.hf next to the output)")
    a = ap.parse_args()

    llama = Path(a.llama_cpp).resolve()
    out = Path(a.out).resolve()
    staging = Path(a.staging).resolve() if a.staging else out.with_suffix(".hf")
    stage(Path(a.checkpoint), staging)

    sys.path.insert(0, str(llama))
    from conversion import base  # the vendored converter's model classes

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("llama_cpp_convert").warning("unlisted tokenizer hash: using the gpt-2 pre-tokenizer")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llama / "convert_hf_to_gguf.py"), str(staging), "--outtype", "bf16", "--outfile", str(out)]
    runpy.run_path(str(llama / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
