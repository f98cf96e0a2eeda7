"""Train a byte-level BPE tokenizer (``tokenizers``) on the corpus.

Special tokens: ``<|endoftext|>`` (id 0, eos and bos) and ``<|pad|>`` (id 1).

Usage::

    python -m training.tokenizer --corpus runs/corpus/train.jsonl --out runs/tokenizer --vocab 8192
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts, vocab_size: int = 8192) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=None)
    return tok


def special_ids(tok: Tokenizer) -> dict:
    return {"eos_token_id": tok.token_to_id(EOS), "pad_token_id": tok.token_to_id(PAD)}


def write_tokenizer(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
                   "pad_token": PAD, "unk_token": None, "add_bos_token": False,
                   "model_max_length": 256}, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="runs/corpus/train.jsonl")
    ap.add_argument("--out", default="runs/tokenizer")
    ap.add_argument("--vocab", type=int, default=8192)
    a = ap.parse_args(argv)
    from training.corpus import load_jsonl

    rows = load_jsonl(a.corpus)
    tok = train_tokenizer((r["text"] for r in rows), a.vocab)
    write_tokenizer(tok, Path(a.out))
    print(f"vocab {tok.get_vocab_size()} -> {a.out}/tokenizer.json", special_ids(tok))


if __name__ == "__main__":
    main()
