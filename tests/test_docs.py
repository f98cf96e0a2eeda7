"""The documentation a cloner gets: every relative link in README files and docs/ resolves inside the
repository (no `../shared/...`), and docs/families.md has a section for every family the code registers."""

from __future__ import annotations

import re
from pathlib import Path

from modeling.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    skip = {".venv", ".git", "node_modules", "runs"}
    return [p for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts)]


def test_relative_links_resolve_inside_the_repository():
    bad = []
    for md in _markdown_files():
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or ROOT not in path.parents and path != ROOT:
                bad.append(f"{md.relative_to(ROOT)}: {target}")
    assert not bad, bad


def test_no_reference_to_files_outside_the_repository():
    hits = []
    for p in [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *ROOT.glob("*/**/*.py")]:
        if ".venv" in p.parts or p == Path(__file__).resolve():
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        for needle in ("../shared", "emo-format.md", "design.md"):
            if needle in text:
                hits.append(f"{p.relative_to(ROOT)}: {needle}")
    assert not hits, hits


def test_families_doc_has_a_section_per_family():
    text = (ROOT / "docs" / "families.md").read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    for model_type in FAMILIES:
        assert any(f"(`{model_type}`)" in h for h in headings), model_type


def _commands(md: Path, program: str) -> list[list[str]]:
    """Arguments of each `program` command in a Markdown file (continuation lines joined; up to `;`)."""
    import shlex

    text = md.read_text(encoding="utf-8").replace("\\\n", " ")
    return [shlex.split(m.group(1)) for m in re.finditer(rf"\b{re.escape(program)} ([^;\n#]*)", text)]


def test_deploy_build_loop_names_a_corpus_the_documented_step_writes_and_bounds_its_documents():
    from subsetting.cli import build_parser

    readme = ROOT / "deploy" / "README.md"
    text = readme.read_text(encoding="utf-8")
    m = re.search(r"python -m training\.corpus --out (\S+?)\)", text)
    assert m, "the corpus step is documented"
    corpus = (ROOT / m.group(1) / "train.jsonl").resolve()  # what training.corpus.build writes
    builds = [c for c in _commands(readme, "emo-subset") if c and c[0] == "build"]
    assert builds
    for cmd in builds:
        args = build_parser().parse_args([w.replace("$p", "python") for w in cmd])
        assert args.max_docs, cmd
        assert [(ROOT / "deploy" / c).resolve() for c in args.corpus] == [corpus], cmd
