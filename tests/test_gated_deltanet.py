"""The Gated DeltaNet layer (modeling.layers.gated_deltanet) against transformers' own layer modules
(Qwen3.5-MoE's four projections, Qwen3-Next's two fused ones) on random float32 weights, and
its per-slot state: a prompt fed in pieces of 1 to 3 tokens then decoded, beside other
sequences, equals the same tokens in one prefill."""

from __future__ import annotations

import pytest
import torch

from modeling.layers.gated_deltanet import (DeltaNetShape, DeltaNetState, DeltaNetWeights, chunk_delta_rule,
                                     gated_deltanet, step_delta_rule)

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = 48
LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
              linear_conv_kernel_dim=4, rms_norm_eps=1e-6)


def _hf_layer(kind: str, seed: int):
    """transformers' layer module with every parameter random (norm weight and dt_bias included)."""
    import transformers
    torch.manual_seed(seed)
    if kind == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet as Layer
        cfg = transformers.Qwen3_5MoeTextConfig(hidden_size=HIDDEN, num_hidden_layers=1, **LINEAR)
    else:
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet as Layer
        cfg = transformers.Qwen3NextConfig(hidden_size=HIDDEN, num_hidden_layers=1, **LINEAR)
    layer = Layer(cfg, 0).float().eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if name == "norm.weight" else 0.0))
    return layer


def _ours(layer) -> tuple[DeltaNetWeights, DeltaNetShape]:
    p = dict(layer.named_parameters())
    w = DeltaNetWeights(conv=p["conv1d.weight"].detach(), dt_bias=p["dt_bias"].detach(),
                        A_log=p["A_log"].detach(), norm=p["norm.weight"].detach(), out=p["out_proj.weight"].detach())
    if "in_proj_qkvz.weight" in p:
        w.qkvz, w.ba = p["in_proj_qkvz.weight"].detach(), p["in_proj_ba.weight"].detach()
    else:
        w.qkv, w.z, w.b, w.a = (p[f"in_proj_{n}.weight"].detach() for n in ("qkv", "z", "b", "a"))
    return w, DeltaNetShape.from_config(LINEAR)


def _run(w, shape, state, x, pieces):
    """Feed `pieces` [(slot, start, n)] packed in one call; x rows in the same order."""
    return gated_deltanet(w, shape, x, state, [p[0] for p in pieces], [p[1] for p in pieces], [p[2] for p in pieces])


@pytest.mark.parametrize("kind", ["qwen3_5_moe", "qwen3_next"])
@pytest.mark.parametrize("n", [1, 7, 70, 130])  # under, over one and over two chunks of 64
def test_prefill_matches_transformers(kind, n):
    layer = _hf_layer(kind, seed=n)
    w, shape = _ours(layer)
    x = torch.randn(1, n, HIDDEN)
    with torch.no_grad():
        want = layer(x)[0]
    got = _run(w, shape, DeltaNetState(shape, 2, torch.float32), x[0], [(1, 0, n)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["qwen3_5_moe", "qwen3_next"])
def test_pieces_and_decode_beside_other_sequences_equal_one_prefill(kind):
    """Three sequences in three slots; each is fed in pieces of 1 to 3 tokens then decoded a
    token at a time, all packed together in the same calls (a piece, a decode step and a new
    prompt in one batch), in a slot an earlier sequence left dirty. Every output row equals
    the one-shot prefill of that sequence."""
    layer = _hf_layer(kind, seed=3)
    w, shape = _ours(layer)
    g = torch.Generator().manual_seed(0)
    lengths = {0: 19, 1: 11, 2: 15}
    xs = {s: torch.randn(n, HIDDEN, generator=g) for s, n in lengths.items()}
    want = {s: _run(w, shape, DeltaNetState(shape, 1, torch.float32), x, [(0, 0, len(x))]) for s, x in xs.items()}

    state = DeltaNetState(shape, 3, torch.float32)
    _run(w, shape, state, torch.randn(5, HIDDEN, generator=g), [(2, 0, 5)])  # a previous owner of slot 2
    pieces = {0: [3, 1, 2, 3], 1: [1, 2], 2: [2, 2, 3, 1]}  # prompt pieces, then decode steps of 1
    done = {s: 0 for s in lengths}
    got = {s: [] for s in lengths}
    late = {2: 2}  # sequence 2 starts two calls later, beside the others' decode
    step = 0
    while any(done[s] < lengths[s] for s in lengths):
        batch = []
        for s in lengths:
            if done[s] >= lengths[s] or step < late.get(s, 0):
                continue
            n = pieces[s].pop(0) if pieces[s] else 1
            n = min(n, lengths[s] - done[s])
            batch.append((s, done[s], n))
        x = torch.cat([xs[s][start:start + n] for s, start, n in batch])
        out = _run(w, shape, state, x, batch)
        off = 0
        for s, start, n in batch:
            got[s].append(out[off:off + n])
            off += n
            done[s] += n
        step += 1
    for s in lengths:
        torch.testing.assert_close(torch.cat(got[s]), want[s], atol=1e-4, rtol=0)


def test_chunked_rule_equals_stepwise_rule():
    """The WY chunk form and the token-by-token recurrence are one rule (from a non-zero state)."""
    g = torch.Generator().manual_seed(1)
    H, n, dk, dv = 3, 150, 8, 5
    q = torch.nn.functional.normalize(torch.randn(H, n, dk, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(H, n, dk, generator=g), dim=-1)
    v = torch.randn(H, n, dv, generator=g)
    decay = -torch.rand(H, n, generator=g) * 0.5
    beta = torch.rand(H, n, generator=g)
    s0 = torch.randn(H, dk, dv, generator=g)
    out, s_chunk = chunk_delta_rule(q, k, v, decay, beta, s0, chunk=16)
    s = s0.clone()
    for t in range(n):
        o = step_delta_rule(q[:, t], k[:, t], v[:, t], decay[:, t], beta[:, t], s)  # s updated in place
        torch.testing.assert_close(out[:, t], o, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_chunk, s, atol=1e-5, rtol=0)


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="not a multiple of linear_num_key_heads"):
        DeltaNetShape.from_config(dict(LINEAR, linear_num_value_heads=3))
