"""Quantized profiles and checkpoints (compressed-tensors pack-quantized): written by
`emo-subset build --quantize` / `emo-subset quantize`, served by load_model and
emo-serve from the mapped file, read by stock transformers the same way.

Tolerances (stated in the assertions): a quantized profile's logits equal those of
its dequantized weights at 1e-4 (float32), and the kernel's product equals
compressed-tensors' own dequantization at 1e-4; against the float32 profile it
was cut from, the relative RMS error of the logits is at most 10% for int8 and
75% for int4 (groups of 32) on these tiny random checkpoints (routing flips
amplify the error; reports/subset measures the quality on the trained twins).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling import CheckpointError, load_model
from modeling.quant import PackedLinear
from modeling.quant.packed import unpack
from modeling.io.safetensors_io import write_safetensors_file
from subsetting.cli import main
from tests.checkpoints import emo_config, write_checkpoint_dir, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
KEPT = {"0": [0, 2, 5, 7], "1": [1, 3, 4, 7], "2": [0, 1, 6, 7]}
IDS = [3, 17, 42, 99, 5, 250, 7, 64, 128, 11, 2, 300]


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float32 EMO checkpoint (hidden 64, experts of 32) and its bf16-free profiles:
    plain, int8, int4 (groups of 32) and int4 with zero points."""
    root = tmp_path_factory.mktemp("quant")
    torch.set_num_threads(1)
    base = write_checkpoint_dir(root / "base", emo_config(hidden_size=64, intermediate_size=32, head_dim=16), seed=5)
    kept = root / "kept.json"
    kept.write_text(json.dumps(KEPT))
    out = {"root": root, "base": base}
    for name, extra in (("plain", []), ("int8", ["--quantize", "int8"]),
                        ("int4", ["--quantize", "int4", "--group-size", "32"]),
                        ("int4-zp", ["--quantize", "int4-zp", "--group-size", "32"])):
        assert run("build", base, "--out", root / name, "--experts-file", kept, "-q", *extra) == 0
        out[name] = root / name
    return out


def test_unpack_matches_compressed_tensors():
    from compressed_tensors.compressors import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.randint(lo, hi + 1, (48, 96), generator=g, dtype=torch.int8)
        packed = pack_to_int32(q, bits)
        assert torch.equal(unpack(packed, bits, 48, 96) - (1 << (bits - 1)), q.to(torch.int16))
        assert torch.equal(unpack_from_int32(packed, bits, q.shape).to(torch.int16), q.to(torch.int16))
        zp = pack_to_int32(q, bits, packed_dim=0)  # zero points are packed along the output dim
        assert torch.equal(unpack(zp.t(), bits, 96, 48).t() - (1 << (bits - 1)), q.to(torch.int16))


@pytest.mark.parametrize("name,tol", [("int8", 0.1), ("int4", 0.75), ("int4-zp", 0.75)])
def test_quantized_profiles_load_and_stay_close_to_the_float_profile(tiny, name, tol):
    from compressed_tensors.compressors import PackedQuantizationCompressor

    ref = load_model(tiny["plain"]).logits(IDS)
    m = load_model(tiny[name])
    cfg = json.loads((tiny[name] / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    lw = m.weights.layers[0]
    assert isinstance(lw.q, PackedLinear) and isinstance(lw.experts.experts[0].down, PackedLinear)
    # router, norms, embeddings, lm_head keep the original dtype
    assert lw.experts.router.dtype == torch.float32 and m.weights.embed.dtype == torch.float32
    assert m.weights.lm_head.dtype == torch.float32
    got = m.logits(IDS)
    # the served logits are those of the dequantized weights (kernels and repacking exact to float32)
    deq_model = load_model(tiny[name])
    for lw_ in deq_model.weights.layers:
        for a in ("q", "k", "v", "o"):
            setattr(lw_, a, getattr(lw_, a).dequantize(torch.float32))
        for e in lw_.experts.experts:
            e.gate, e.up, e.down = (x.dequantize(torch.float32) for x in (e.gate, e.up, e.down))
    torch.testing.assert_close(got, deq_model.logits(IDS), rtol=1e-4, atol=1e-4)
    # and close to the float profile (relative RMS; random tiny weights are a worst case:
    # the held-out perplexity of the demo twins in reports/subset is the quality measure)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel <= tol, (name, rel)
    # the kernel's product equals compressed-tensors' dequantized weight (float32)
    w = lw.experts.experts[1].up
    x = torch.randn(5, w.shape[1])
    sd = {"weight_packed": w.packed, "weight_scale": w.scale, "weight_shape": torch.tensor(w.shape)}
    if w.zero_point is not None:
        sd["weight_zero_point"] = w.zero_point
    deq = PackedQuantizationCompressor.decompress(sd, w.scheme.ct_scheme())["weight"].float()
    torch.testing.assert_close(w.linear(x), x @ deq.t(), rtol=1e-4, atol=1e-4)
    # bytes: about a quarter (int8) / an eighth (int4) of float32 for every quantized matrix
    assert m.expert_bytes(0, 0) < load_model(tiny["plain"]).expert_bytes(0, 0) / (3 if name == "int8" else 5)


def test_quantize_whole_checkpoint_matches_the_quantized_profile(tiny):
    """`emo-subset quantize` over a profile gives the same tensors as `build --quantize`."""
    out = tiny["root"] / "plain-int4"
    assert run("quantize", tiny["plain"], "--out", out, "--quantize", "int4", "--group-size", "32", "-q") == 0
    a, b = load_model(out), load_model(tiny["int4"])
    torch.testing.assert_close(a.logits(IDS), b.logits(IDS), rtol=0, atol=0)
    assert (out / "profile.json").is_file()
    assert run("verify", out, "-q") == 0


def _olmoe(root: Path) -> Path:
    """A stock OLMoE checkpoint written by transformers (dims multiples of 128)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(vocab_size=320, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                                   max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=0,
                                   pad_token_id=1)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    m.save_pretrained(root / "olmoe")
    write_tokenizer(root / "olmoe", 320)
    return root / "olmoe"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_stock_transformers_loads_a_quantized_olmoe_profile_and_agrees(tmp_path, scheme):
    transformers = pytest.importorskip("transformers")
    base = _olmoe(tmp_path)
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps({"0": [0, 1, 4, 6], "1": [2, 3, 5, 7]}))
    prof = tmp_path / scheme
    assert run("build", base, "--out", prof, "--experts-file", kept, "--quantize", scheme, "-q") == 0
    ours = load_model(prof).logits(IDS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(prof, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([IDS])).logits[0].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_bad_input_is_a_clear_error_and_writes_nothing(tiny, capsys):
    root = tiny["root"]
    kept = root / "kept.json"
    # a group size that does not divide the input dimension (hidden 64)
    assert run("build", tiny["base"], "--out", root / "bad-group", "--experts-file", kept, "--quantize", "int4",
               "--group-size", "48", "-q") == 2
    err = capsys.readouterr().err
    assert "group size 48 does not divide" in err and "Traceback" not in err
    assert not (root / "bad-group").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".bad-group")]
    assert run("quantize", tiny["base"], "--out", root / "bad-group2", "--quantize", "int4", "-q") == 2
    assert "group size 128 does not divide" in capsys.readouterr().err and not (root / "bad-group2").exists()
    # an unknown scheme: argparse names the choices
    with pytest.raises(SystemExit) as e:
        run("build", tiny["base"], "--out", root / "bad-scheme", "--experts-file", kept, "--quantize", "int3")
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    assert not (root / "bad-scheme").exists()
    # a missing scale tensor
    broken = root / "broken"
    subprocess.run(["cp", "-r", str(tiny["int8"]), str(broken)], check=True)
    files = load_model(broken).files
    f = next(iter(files.files.values()))
    keep = [(n, files.get(n).clone()) for n in f.tensors if n != "model.layers.1.self_attn.k_proj.weight_scale"]
    write_safetensors_file(f.path, keep)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.k_proj.weight_scale' is missing"):
        load_model(broken)
    # a quantization config we do not serve
    cfg = json.loads((tiny["int8"] / "config.json").read_text())
    for bad, msg in ((("quant_method", "awq"), "quantization method 'awq' is not supported"),
                     (("format", "marlin-24"), "format 'marlin-24' is not supported")):
        c = json.loads(json.dumps(cfg))
        c["quantization_config"][bad[0]] = bad[1]
        (broken / "config.json").write_text(json.dumps(c))
        with pytest.raises(CheckpointError, match=msg):
            load_model(broken)


def test_emo_serve_serves_an_int4_profile(tiny, tmp_path):
    from modeling import SamplingParams
    from tests.test_server import Server

    s = Server(["--profile", str(tiny["int4"]), "--served-model-name", "q", "--mlock", "--log-level", "info"],
               tmp_path / "q.log").wait()
    try:
        r = s.post("/v1/completions", {"model": "q", "prompt": IDS, "max_tokens": 6, "temperature": 0,
                                       "ignore_eos": True})
        assert r.status_code == 200, r.text
        ours = load_model(tiny["int4"]).generate(IDS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        assert r.json()["choices"][0]["text"] == ours.text
        assert r.json()["usage"]["completion_tokens"] == 6
        assert s.get("/v1/profiles").status_code == 200
        # --mlock: base weights locked (or pre-faulted where locking is refused), quantized matrices repacked
        log = (tmp_path / "q.log").read_text()
        assert "--mlock: " in log and "quantized matrices repacked" in log, log
        status = Path(f"/proc/{s.proc.pid}/status").read_text()
        locked_kib = int(next(x for x in status.splitlines() if x.startswith("VmLck:")).split()[1])
        assert locked_kib > 0 or "--mlock: populate" in log or "--mlock: read" in log, (locked_kib, log)
    finally:
        s.stop()


def test_pin_locks_the_pages_a_pool_uses(tiny):
    m = load_model(tiny["plain"])
    pool = {0: [0, 2], 1: [1, 3], 2: [0, 1]}
    res = m.pin(pool)
    assert res["method"] in ("mlock", "populate", "read") and res["repacked_matrices"] == 0
    le = m.weights.layers[0].experts
    from server.memory import resident_bytes

    used = [t for e in (0, 2) for t in le.experts[le.ids.index(e)].tensors()] + [m.weights.lm_head]
    got, total = resident_bytes(used)
    assert got == total  # every page of what the pool reads is in memory
    q = load_model(tiny["int8"])
    if q.transformer.kernels.native:  # the native kernels' interleaved copies are made now, and locked
        packed = q.weights.layers[0].experts.experts[0].gate
        mapped = packed.packed
        res = q.pin(None)
        assert res["repacked_matrices"] == 3 * (4 + 3 * 4)
        assert packed.tensors()[0] is not mapped and packed.tensors()[0].numel() >= mapped.numel() * 4
        assert resident_bytes(packed.tensors())[0] == resident_bytes(packed.tensors())[1]
        assert q.pin(None)["repacked_matrices"] == 0  # made once
    else:  # ATen's kernels want their own layouts: every quantized matrix is repacked now
        assert q.pin(None)["repacked_matrices"] == 3 * (4 + 3 * 4)


def test_pin_repacks_quantized_matrices_on_the_torch_path(tiny, torch_path):
    q = load_model(tiny["int8"])
    assert q.pin(None)["repacked_matrices"] == 3 * (4 + 3 * 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")
def test_int4_profile_on_cuda_matches_cpu(tiny):
    cpu = load_model(tiny["int4"]).logits(IDS)
    gpu = load_model(tiny["int4"], device="cuda").logits(IDS).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
