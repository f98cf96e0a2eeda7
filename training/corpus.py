"""Build a deterministic multi-domain corpus from text every fresh machine has.

Domains (documents kept whole, labelled):

- ``python``: the Python standard library (``/usr/lib/python3.*``, tests excluded)
- ``c``: C headers under ``/usr/include``
- ``prose``: English prose under ``/usr/share``: licence texts
  (``common-licenses``), package ``copyright`` / ``README`` / ``NEWS`` files
  and the nodes of the GNU ``info`` manuals
- ``arith``: generated arithmetic and small structured records (seeded RNG)

Every domain is capped to ``--max-mb`` of text, chosen by a content hash so the
selection does not depend on directory order.  The held-out split is chosen by
a hash of the document's identity; a copy capped to a few KB per document is
written to ``training/data/heldout.jsonl`` (committed).

Usage::

    python -m training.corpus --out runs/corpus
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import random
import sys
from pathlib import Path

from tqdm import tqdm

DOMAINS = ("python", "c", "prose", "arith")
HELDOUT_PATH = Path(__file__).parent / "data" / "heldout.jsonl"
MIN_CHARS = 400


def _h(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def _read(path: str) -> str | None:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except OSError:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    return text.replace("\r\n", "\n")


def _stdlib_dir() -> str:
    cands = sorted(glob.glob("/usr/lib/python3.[0-9]*"))
    cands = [c for c in cands if os.path.isfile(os.path.join(c, "os.py"))]
    if cands:
        return cands[-1]
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


def python_docs():
    root = _stdlib_dir()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        if any(p in ("test", "tests", "idle_test", "site-packages", "dist-packages") for p in parts):
            continue
        t = _read(path)
        if t:
            yield "py:" + rel, t


def c_docs():
    for path in sorted(glob.glob("/usr/include/**/*.h", recursive=True)):
        if os.path.islink(path):
            continue
        t = _read(path)
        if t:
            yield "h:" + os.path.relpath(path, "/usr/include"), t


def prose_docs():
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path) and not os.path.islink(path):
            t = _read(path)
            if t:
                yield "lic:" + os.path.basename(path), t
    names = ("copyright", "README", "README.gz", "README.Debian", "README.Debian.gz", "NEWS",
             "NEWS.gz", "NEWS.Debian.gz", "README.txt", "AUTHORS", "THANKS", "THANKS.gz")
    for path in sorted(glob.glob("/usr/share/doc/*/*")):
        if os.path.basename(path) in names and os.path.isfile(path) and not os.path.islink(path):
            t = _read(path)
            if t:
                yield "doc:" + os.path.relpath(path, "/usr/share/doc"), t
    for path in sorted(glob.glob("/usr/share/info/*.info*")):
        t = _read(path)
        if not t:
            continue
        for k, node in enumerate(t.split("\x1f")):
            node = node.strip("\n")
            if node.startswith("File:") or node.startswith("Tag Table") or node.startswith("Indirect:"):
                if node.startswith("File:"):
                    # drop the navigation header line
                    node = node.split("\n", 1)[1] if "\n" in node else ""
                else:
                    continue
            yield f"info:{os.path.basename(path)}#{k}", node


def _arith_doc(rng: random.Random) -> str:
    kind = rng.randrange(4)
    lines = []
    n = rng.randint(20, 60)
    if kind == 0:
        for _ in range(n):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice("+-*")
            r = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {r}")
    elif kind == 1:
        lines.append("id,name,qty,price,total")
        names = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "yam", "leek", "bean"]
        for i in range(n):
            q, p = rng.randint(1, 40), rng.randint(1, 500) / 10
            lines.append(f"{i + 1},{rng.choice(names)},{q},{p:.2f},{q * p:.2f}")
    elif kind == 2:
        for _ in range(n):
            a, b = rng.randint(2, 99), rng.randint(2, 12)
            lines.append(f"{a * b} / {b} = {a}" if rng.random() < 0.5 else f"{a} % {b} = {a % b}")
    else:
        x = rng.randint(1, 50)
        for i in range(n):
            d = rng.randint(1, 20)
            op = rng.choice("+-")
            y = x + d if op == "+" else x - d
            lines.append(f"x{i} = {x} {op} {d} = {y}")
            x = y
    return "\n".join(lines) + "\n"


def arith_docs(n_docs: int, seed: int = 1234):
    rng = random.Random(seed)
    for i in range(n_docs):
        yield f"arith:{i}", _arith_doc(rng)


def _cap(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1 if cut > max_chars // 2 else max_chars]


def build(out: Path, max_mb: float = 4.0, n_heldout: int = 40, heldout_chars: int = 2000,
          heldout_path: Path = HELDOUT_PATH, arith_n: int = 4000) -> dict:
    sources = {
        "python": python_docs(),
        "c": c_docs(),
        "prose": prose_docs(),
        "arith": arith_docs(arith_n),
    }
    seen: set[int] = set()
    train, test = [], []
    stats = {}
    for dom, gen in sources.items():
        docs = []
        for ident, text in tqdm(gen, desc=f"read {dom}", leave=False):
            text = text.strip("\n") + "\n"
            if len(text) < MIN_CHARS:
                continue
            key = _h(text)
            if key in seen:
                continue
            seen.add(key)
            docs.append((ident, text))
        # deterministic order independent of the file system: by hash of identity
        docs.sort(key=lambda d: _h(dom + "|" + d[0]))
        held, rest = docs[:n_heldout], docs[n_heldout:]
        budget = int(max_mb * 1e6)
        kept, total = [], 0
        for ident, text in rest:
            if total >= budget:
                break
            text = _cap(text, 200_000)
            kept.append((ident, text))
            total += len(text)
        for ident, text in kept:
            train.append({"id": ident, "domain": dom, "text": text})
        for ident, text in held:
            test.append({"id": ident, "domain": dom, "text": _cap(text, heldout_chars)})
        stats[dom] = {"available": len(docs), "train_docs": len(kept), "train_chars": total,
                      "heldout_docs": len(held)}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    heldout_path.parent.mkdir(parents=True, exist_ok=True)
    with open(heldout_path, "w") as f:
        for r in test:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(out / "stats.json", "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def load_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/corpus")
    ap.add_argument("--max-mb", type=float, default=4.0, help="text per domain (train split)")
    ap.add_argument("--heldout", type=int, default=40, help="held-out documents per domain")
    ap.add_argument("--heldout-chars", type=int, default=2000)
    ap.add_argument("--heldout-path", default=str(HELDOUT_PATH))
    a = ap.parse_args(argv)
    stats = build(Path(a.out), a.max_mb, a.heldout, a.heldout_chars, Path(a.heldout_path))
    json.dump(stats, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
