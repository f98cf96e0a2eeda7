"""subsetting.repair_report: the per-cell cache that lets a stopped report run continue, on a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from subsetting import repair_report
from tests.checkpoints import emo_config, write_checkpoint_dir, write_domain_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
PARTS = ["full", "select:mean-prob", "select:reap", "distill+finetune", "merge+distill+finetune", "finetune",
         "full+finetune"]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    full = write_checkpoint_dir(tmp_path / "full", emo_config(), seed=3)
    corpus = write_domain_corpus(tmp_path / "corpus.jsonl")
    monkeypatch.setitem(repair_report.TWINS, "tiny", ("tiny twin", str(full)))

    def report(*extra: str) -> tuple[dict, str]:
        repair_report.main(["--twins", "tiny", "--keep", "4", "--domains", "prose", "--methods", "mean-prob,reap",
                            "--calib", str(corpus), "--heldout", str(corpus), "--calib-docs", "3",
                            "--max-tokens", "64", "--cells", str(tmp_path / "cells"),
                            "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md"), *extra])
        return json.loads((tmp_path / "r.json").read_text()), (tmp_path / "r.md").read_text()

    return tmp_path / "cells" / "tiny-4-prose.json", report


def test_a_stopped_cell_continues_where_it_stopped_and_other_settings_start_it_again(tiny):
    cell, report = tiny
    res, md = report("--distill-steps", "2", "--finetune-steps", "4:2")
    data = json.loads(cell.read_text())
    assert data["done"] == PARTS and not res["meta"]["not_run"]
    assert set(data["repair"]) == {"distill", "distill+finetune", "merge", "merge+distill", "merge+distill+finetune",
                                   "finetune", "full+finetune"}
    assert data["repair"]["full+finetune"]["steps"] == 2 and "not run" not in md
    row = next(r for r in md.splitlines() if r.startswith("| **tiny twin** | 4 | 2/2 |"))
    assert row.count("x**") == 2 + 5 + 1  # selections, repairs, control: every geometric mean measured

    # as if the run had stopped before the last two parts; a marked value shows what is reused
    data["done"] = PARTS[:-2]
    for k in ("finetune", "full+finetune"):
        del data["repair"][k]
    data["select"]["reap"]["ppl"]["heldout"] = 12345.0
    cell.write_text(json.dumps(data))
    res, md = report("--render", "--distill-steps", "2", "--finetune-steps", "2")
    assert res["meta"]["not_run"] == ["tiny twin keep 4 prose: finetune, full+finetune"]
    assert "not run" in md
    res, _ = report("--distill-steps", "2", "--finetune-steps", "2")
    again = json.loads(cell.read_text())
    assert again["done"] == PARTS and not res["meta"]["not_run"]
    assert again["select"]["reap"]["ppl"]["heldout"] == 12345.0  # kept, not measured again
    assert again["repair"]["distill"] == data["repair"]["distill"]
    assert again["repair"]["full+finetune"]["steps"] == 2

    report("--distill-steps", "3", "--finetune-steps", "2")  # other steps: the selections stand, repairs redone
    third = json.loads(cell.read_text())
    assert third["settings"]["distill_steps"] == 3 and third["done"] == PARTS
    assert third["select"]["reap"]["ppl"]["heldout"] == 12345.0
    assert third["repair"]["distill"]["steps"] == 3 and third["repair"]["full+finetune"]["steps"] == 2

    report("--distill-steps", "3", "--finetune-steps", "2", "--max-tokens", "48")  # other data: all again
    fourth = json.loads(cell.read_text())
    assert fourth["settings"]["max_tokens"] == 48 and fourth["done"] == PARTS
    assert fourth["select"]["reap"]["ppl"]["heldout"] != 12345.0


def test_the_control_is_measured_once_per_twin_and_domain(tiny, tmp_path):
    cell, report = tiny
    report("--distill-steps", "2", "--finetune-steps", "2", "--runs", "distill+finetune,full+finetune")
    res, md = report("--keep", "5", "--distill-steps", "3", "--finetune-steps", "2",
                     "--runs", "distill+finetune,full+finetune")
    other = json.loads((cell.parent / "tiny-5-prose.json").read_text())
    assert other["repair"]["full+finetune"]["measured_in"] == cell.name
    assert other["repair"]["full+finetune"]["ppl"] == json.loads(cell.read_text())["repair"]["full+finetune"]["ppl"]
    assert res["meta"]["not_run"] == ["tiny twin keep 5 prose: merge+distill+finetune, finetune"]
    assert "| tiny twin | 5 | 3/2 | prose |" in md


def test_render_lists_cells_never_run(tiny, tmp_path):
    _, report = tiny
    res, md = report("--render")
    assert res["meta"]["not_run"] == ["tiny twin keep 4 prose: all"] and res["results"] == {}
    assert "Not run (no figures): tiny twin keep 4 prose: all." in md
