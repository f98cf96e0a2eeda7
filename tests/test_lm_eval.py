"""lm-evaluation-harness's `local-completions` run unchanged against the bundled
demo (issue 12 item 9): only base_url, model and max_length are given; lm-eval
finds vLLM's tokenizer endpoints (/tokenizer_info, /tokenize, /detokenize) and
uses the server's tokenizer. The tasks are local (a yaml and a jsonl written
here; no network: HF_DATASETS_OFFLINE)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.test_server import Server, _env

if importlib.util.find_spec("lm_eval") is None:
    pytest.skip("lm-eval is not installed (pip install -e '.[test]')", allow_module_level=True)

TASKS = """task: {name}_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} ="
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

GEN = """task: {name}_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}} ="
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: [";", "\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


def write_tasks(folder) -> None:
    rows = []
    for i in range(12):
        a, b = 3 + 7 * i % 40, 5 + 11 * i % 30
        c = a + b
        rows.append({"question": f"{a} + {b}", "choices": [f" {c}", f" {c + 3}", f" {c + 10}", f" {2 * c}"],
                     "answer": 0})
    data = folder / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "arith_mc.yaml").write_text(TASKS.format(name="arith", data=data))
    (folder / "arith_gen.yaml").write_text(GEN.format(name="arith", data=data))


def test_lm_eval_local_completions_unchanged(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    s = Server([], tmp_path / "server.log")  # no --model: the bundled demo and its profiles
    try:
        s.wait(120)
        env = _env()
        env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
                   TOKENIZERS_PARALLELISM="false")
        env.pop("OPENAI_API_KEY", None)
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"base_url={s.url}/v1/completions,model=emo-demo:arith,max_length=256",
               "--tasks", "arith_mc,arith_gen", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        assert "Using remote tokenizer" in out or "remote tokenizer" in out.lower(), out
        results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
        assert 0 <= results["arith_mc"]["acc,none"] <= 1
        assert 0 <= results["arith_gen"]["exact_match,none"] <= 1
    finally:
        s.stop()
    assert "Traceback" not in s.log.read_text()
