"""How well does profile "auto" pick the right profile? The rules of
`server.registry.Registry.choose_auto`, side by side on labelled text the
profiles never saw:

- the project's held-out split (`training/data/heldout.jsonl`), and
- third-party text nobody here chose: Python and C sources, package prose
  (METADATA and licence files) and numeric CSV tables from the packages
  installed beside emo-serve (site-packages), picked by a hash of the path.

    python -m subsetting.auto_rules [--max-tokens 256] [--min-fit X] [--json out.json]

Prints accuracy per rule and text set, per domain, where the misses went and
how often `auto` fell back to `full` (the best fit below --min-fit, the
server's --auto-min-fit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
import time
from pathlib import Path

from server.config import ServerConfig
from server.registry import AUTO_RULES, Registry

from .corpus import Document, read_corpus

HELDOUT = "training/data/heldout.jsonl"
PER_DOMAIN = 24
CHARS = 1500


def _pick(paths: list[Path], n: int) -> list[Path]:
    return sorted(paths, key=lambda p: hashlib.sha256(str(p.name + str(p.parent.name)).encode()).hexdigest())[:n]


def _text(p: Path, start: int = 0) -> str | None:
    try:
        t = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    t = t[start:start + CHARS].strip()
    return t if len(t) > 200 else None


def thirdparty_docs(site: Path | None = None) -> list[Document]:
    """Labelled third-party text from the installed packages (see the module docstring)."""
    site = site or Path(sysconfig.get_paths()["purelib"])
    sources = {
        "python": [p for pkg in ("httpx", "click", "jinja2", "starlette", "anyio", "idna", "h11", "attr")
                   for p in (site / pkg).rglob("*.py") if p.stat().st_size > 2000],
        "c": list(site.rglob("*.c")) + list((site / "numpy").rglob("*.h")),
        "prose": [p for p in site.glob("*.dist-info/licenses/*")] + [p for p in site.glob("*.dist-info/LICENSE*")],
        "arith": [p for p in site.rglob("*.csv") if p.stat().st_size > 1000],
    }
    docs = []
    for dom, paths in sources.items():
        for p in _pick([p for p in paths if p.is_file()], PER_DOMAIN):
            t = _text(p, start=200 if dom == "arith" else 0)  # past a CSV's header line
            if t:
                docs.append(Document(t, dom, str(p.relative_to(site))))
    return docs


def evaluate(registry: Registry, docs: list[Document], max_tokens: int, rules=AUTO_RULES) -> dict:
    tok = registry.model.tokenizer
    names = set(registry.names())
    out = {}
    for rule in rules:
        rows, t0 = [], time.time()
        for d in docs:
            if d.domain not in names:
                continue
            ids = tok.encode(d.text)[:max_tokens]
            rows.append((d.domain, registry.choose_auto(ids, rule), d.source))
        by_dom = {}
        for dom in sorted({r[0] for r in rows}):
            mine = [r for r in rows if r[0] == dom]
            misses: dict[str, int] = {}
            for r in mine:
                if r[1] != dom:
                    misses[r[1]] = misses.get(r[1], 0) + 1
            by_dom[dom] = {"n": len(mine), "right": sum(r[1] == dom for r in mine), "misses": misses}
        out[rule] = {"n": len(rows), "right": sum(r[0] == r[1] for r in rows), "domains": by_dom,
                     "fallback": sum(r[1] == "full" for r in rows), "seconds": round(time.time() - t0, 2)}
    return out


def markdown(results: dict[str, dict]) -> str:
    sets = list(results)
    lines = ["| rule | " + " | ".join(f"{s} (right / docs, fell back to full)" for s in sets) + " | misses |",
             "|---|" + "---|" * len(sets) + "---|"]
    for rule in [r for r in AUTO_RULES if all(r in results[s] for s in sets)]:
        cells, misses = [], []
        for s in sets:
            r = results[s][rule]
            cells.append(f"{r['right']}/{r['n']} ({100 * r['right'] / max(r['n'], 1):.0f}%), {r.get('fallback', 0)}")
            for dom, d in r["domains"].items():
                for to, n in d["misses"].items():
                    misses.append(f"{s}: {dom}->{to} x{n}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " | " + ("; ".join(misses) or "none") + " |")
    return "\n".join(lines)


def run(max_tokens: int = 256, heldout: str = HELDOUT, min_fit: float = 0.0, rules=AUTO_RULES) -> dict:
    reg = Registry.from_config(ServerConfig(auto_min_fit=min_fit))  # the bundled demo and its shipped profiles
    return {"held-out split": evaluate(reg, read_corpus([heldout]), max_tokens, rules),
            "third-party": evaluate(reg, thirdparty_docs(), max_tokens, rules)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--heldout", default=HELDOUT)
    ap.add_argument("--json", default=None)
    ap.add_argument("--min-fit", type=float, default=0.0, help="the server's --auto-min-fit: below it, full")
    ap.add_argument("--rules", default=",".join(AUTO_RULES), help="comma-separated rules to measure "
                    "(perplexity runs one forward per profile: the slow one)")
    a = ap.parse_args(argv)
    rules = [r for r in a.rules.split(",") if r]
    bad = [r for r in rules if r not in AUTO_RULES]
    if bad:
        raise SystemExit(f"--rules: unknown {bad[0]!r} (one of {', '.join(AUTO_RULES)})")
    res = run(a.max_tokens, a.heldout, a.min_fit, rules)
    print(markdown(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
