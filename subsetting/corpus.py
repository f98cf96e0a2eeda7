"""Calibration and held-out text: `.jsonl` (`text`, optional `domain`), `.txt` files, folders of them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import SubsetError

SUFFIXES = (".jsonl", ".txt")


@dataclass
class Document:
    text: str
    domain: str | None
    source: str


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SubsetError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SubsetError(f"{path}: not valid UTF-8 text (undecodable byte at offset {e.start})") from None


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise SubsetError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
            raise SubsetError(f"{path}:{n}: expected an object with a string 'text' field")
        dom = d.get("domain")
        docs.append(Document(d["text"], None if dom is None else str(dom), f"{path}:{n}"))
    return docs


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not found:
            raise SubsetError(f"{path}: folder holds no .jsonl or .txt files")
        return found
    if not path.exists():
        raise SubsetError(f"{path}: no such corpus file or folder")
    if path.suffix not in SUFFIXES:
        raise SubsetError(f"{path}: unsupported corpus file (expected .jsonl, .txt or a folder)")
    return [path]


def read_corpus(paths: Iterable[str | Path], domain: str | None = None) -> list[Document]:
    """Every non-empty document of `paths`; with `domain`, only that domain's
    (unlabelled documents get `domain` as their label)."""
    paths = list(paths)
    if not paths:
        raise SubsetError("no corpus given")
    docs: list[Document] = []
    for p in paths:
        for f in _files(Path(p)):
            if f.suffix == ".jsonl":
                docs.extend(_read_jsonl(f))
            else:
                docs.append(Document(_read_text(f), None, str(f)))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise SubsetError(f"corpus {', '.join(map(str, paths))} holds no documents (empty)")
    if domain is not None:
        labelled = {d.domain for d in docs if d.domain is not None}
        picked = [d for d in docs if d.domain == domain or d.domain is None]
        if not any(d.domain == domain for d in picked) and labelled:
            raise SubsetError(f"corpus has no documents of domain {domain!r} (domains: {', '.join(sorted(labelled))})")
        for d in picked:
            d.domain = domain
        docs = picked
    return docs


def tokenize(docs: list[Document], tokenizer, max_tokens: int) -> tuple[list[Document], list[list[int]]]:
    """Token ids per document (truncated to max_tokens); documents with no token are dropped."""
    if tokenizer is None:
        raise SubsetError("the model has no tokenizer.json, so text cannot be encoded")
    ids = tokenizer.encode_batch([d.text for d in docs])
    kept = [(d, t[:max_tokens]) for d, t in zip(docs, ids) if t]
    if not kept:
        raise SubsetError("no document of the corpus encodes to any token")
    return [d for d, _ in kept], [t for _, t in kept]


def sample(docs: list[Document], max_docs: int | None) -> list[Document]:
    """At most `max_docs` documents in all, split evenly between the domain labels
    (a domain with fewer documents than its share gives the rest to the others),
    evenly spaced within each domain (deterministic). A small domain is not
    drowned by a big one: each gets the same number when it has them."""
    if not max_docs or len(docs) <= max_docs:
        return docs
    by: dict[str | None, list[Document]] = {}
    for d in docs:
        by.setdefault(d.domain, []).append(d)
    if max_docs < len(by):
        raise SubsetError(f"--max-docs {max_docs} is fewer than the {len(by)} domains of the corpus: give at least "
                          f"{len(by)}, or calibrate one domain with --domain")
    quota: dict[str | None, int] = {}
    left = max_docs
    for k, (dom, group) in enumerate(sorted(by.items(), key=lambda kv: len(kv[1]))):  # smallest first
        quota[dom] = min(len(group), left // (len(by) - k))
        left -= quota[dom]
    out = []
    for dom, group in by.items():
        step = len(group) / quota[dom]
        out.extend(group[int(i * step)] for i in range(quota[dom]))
    return out


# Below these, a domain's mean routing (and so the experts chosen for it) rests on too little text
# to be stable: the choice changes from one sample of the domain to the next.
MIN_DOCS, MIN_TOKENS = 16, 4096


def small_calibration(labels: list[str | None], tokens: list[int]) -> list[str]:
    """A warning per domain whose calibration has fewer than MIN_DOCS documents or MIN_TOKENS tokens."""
    docs: dict[str, int] = {}
    toks: dict[str, int] = {}
    for lab, n in zip(labels, tokens):
        key = lab if lab is not None else "(unlabelled)"
        docs[key] = docs.get(key, 0) + 1
        toks[key] = toks.get(key, 0) + int(n)
    return [f"domain {dom!r} has only {docs[dom]} documents / {toks[dom]} tokens of calibration (fewer than "
            f"{MIN_DOCS} documents or {MIN_TOKENS} tokens make a noisy choice of experts): add text or raise "
            "--max-docs / --max-tokens"
            for dom in sorted(docs) if docs[dom] < MIN_DOCS or toks[dom] < MIN_TOKENS]
