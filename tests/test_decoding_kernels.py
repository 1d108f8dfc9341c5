"""The decoding kernels against the full-sequence ones: a sequence fed chunk by chunk through the ring buffer (and,
for LoLCATs' hybrid, the linear state) must give the full-sequence window / hybrid attention, padding included."""
import pytest
import torch

from linearize.kernels.hybrid import hybrid_attention_fwd
from linearize.kernels.naive import naive_hybrid_attention, naive_softmax_attention
from linearize.kernels.ring import ring_attention
from linearize.kernels.window import window_attention_fwd
from linearize.rewrite.gates import hedgehog_feature, softmax_feature

from conftest import rel_rmse

CHUNKINGS = [[1] * 12, [5, 1, 1, 7], [12], [3, 9], [20, 1, 2]]


def _inputs(B, Hq, Hkv, T, D, Dv, F=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return x(B, Hq, T, D), x(B, Hkv, T, D), x(B, Hkv, T, Dv)


def _empty_ring(B, Hkv, W, D, Dv, F=None, dtype=torch.float64):
    ring = [torch.zeros(B, Hkv, W, D, dtype=dtype), torch.zeros(B, Hkv, W, Dv, dtype=dtype),
            torch.full((B, W), -1, dtype=torch.long)]
    if F is not None:
        ring += [torch.zeros(B, Hkv, W, F, dtype=dtype), torch.zeros(B, Hkv, F, Dv, dtype=dtype),
                 torch.zeros(B, Hkv, F, dtype=dtype)]
    return ring


def _sink_buffers(B, Hkv, N, D, Dv, dtype=torch.float64):
    return [torch.zeros(B, Hkv, N, D, dtype=dtype), torch.zeros(B, Hkv, N, Dv, dtype=dtype),
            torch.full((B, N), -1, dtype=torch.long)]


def _run_chunks(q, k, v, window, chunks, fq=None, fk=None, valid=None, block=4, sinks=0):
    B, Hkv, T, D = k.shape
    F = None if fq is None else fq.shape[-1]
    ring = _empty_ring(B, Hkv, window, D, v.shape[-1], F, q.dtype)
    sink = _sink_buffers(B, Hkv, sinks, D, v.shape[-1], q.dtype)
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
    outs, start = [], 0
    for n in chunks:
        n = min(n, T - start)
        if n <= 0:
            break
        sl = slice(start, start + n)
        extra = dict(sink_k=sink[0], sink_v=sink[1], sink_pos=sink[2]) if sinks else {}
        if fq is not None:
            extra.update(fq=fq[:, :, sl], fk=fk[:, :, sl], ring_fk=ring[3], state=ring[4], norm=ring[5])
        res = ring_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], valid[:, sl], torch.tensor(start),
                             ring[0], ring[1], ring[2], 0.5, window, block=block, **extra)
        outs.append(res[0])
        ring = list(res[1:4]) + ([res[4], res[5], res[6]] if fq is not None else [])
        first_sink = 7 if fq is not None else 4
        sink = list(res[first_sink:first_sink + 3]) if sinks else sink
        start += n
    return torch.cat(outs, dim=2), ring


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("window", [1, 3, 4, 16])
@pytest.mark.parametrize("groups", [1, 3])
def test_window_ring_matches_full_sequence(chunks, window, groups):
    q, k, v = _inputs(2, 3 * groups, 3, 12, 8, 5)
    ours, _ = _run_chunks(q, k, v, window, chunks)
    ref = window_attention_fwd(q, k, v, 0.5, window)[0]
    assert rel_rmse(ours, ref) < 1e-12


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("window,sinks", [(1, 1), (3, 2), (4, 5), (16, 4)])
def test_window_ring_with_sinks_matches_full_sequence(chunks, window, sinks):
    """Attention sinks: the first N tokens, kept beside the ring, give the full-sequence kernel and the reference."""
    q, k, v = _inputs(2, 6, 3, 12, 8, 5, seed=3)
    ours, _ = _run_chunks(q, k, v, window, chunks, sinks=sinks)
    ref = window_attention_fwd(q, k, v, 0.5, window, sinks)[0]
    assert rel_rmse(ours, ref) < 1e-12
    naive = naive_softmax_attention(q, k, v, scale=0.5, window=window, sink_tokens=sinks)
    assert rel_rmse(ours, naive) < 1e-12
    if window < 12:  # the sinks change the result (guards against a kernel that ignores them)
        assert rel_rmse(ours, window_attention_fwd(q, k, v, 0.5, window)[0]) > 1e-3


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("window", [1, 3, 4, 16])
@pytest.mark.parametrize("feature", [softmax_feature, hedgehog_feature])
def test_hybrid_ring_and_state_match_full_sequence(chunks, window, feature):
    q, k, v = _inputs(2, 6, 3, 12, 8, 5)
    fq, fk = feature(q), feature(k)
    ours, _ = _run_chunks(q, k, v, window, chunks, fq=fq, fk=fk)
    ref = hybrid_attention_fwd(q, k, v, fq, fk, 0.5, window)
    assert rel_rmse(ours, ref) < 1e-12
    naive = naive_hybrid_attention(q, k, v, fq, fk, 0.5, window)
    assert rel_rmse(ours, naive) < 1e-12


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("window,sinks", [(1, 1), (3, 2), (4, 5), (16, 4)])
def test_hybrid_ring_with_sinks_matches_full_sequence(chunks, window, sinks):
    """LoLCATs with sinks: the sink keys keep exact scores beside the ring and stay out of the linear sums."""
    q, k, v = _inputs(2, 6, 3, 12, 8, 5, seed=3)
    fq, fk = softmax_feature(q), softmax_feature(k)
    ours, _ = _run_chunks(q, k, v, window, chunks, fq=fq, fk=fk, sinks=sinks)
    ref = hybrid_attention_fwd(q, k, v, fq, fk, 0.5, window, sinks)
    assert rel_rmse(ours, ref) < 1e-12
    assert rel_rmse(ours, naive_hybrid_attention(q, k, v, fq, fk, 0.5, window, sinks)) < 1e-12
    if window < 12:  # the sinks change the result
        assert rel_rmse(ours, hybrid_attention_fwd(q, k, v, fq, fk, 0.5, window)) > 1e-3


@pytest.mark.parametrize("hybrid,sinks", [(False, 0), (True, 0), (False, 2), (True, 2)])
def test_padding_never_reaches_ring_or_state(hybrid, sinks):
    """Row 0 is left-padded by 4; its outputs on real tokens equal those of the unpadded sequence run alone."""
    q, k, v = _inputs(2, 6, 3, 12, 8, 5, seed=1)
    pad = 4
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :pad] = False
    q[0, :, :pad] = 1e4  # garbage on padding: must not leak
    k[0, :, :pad] = -1e4
    v[0, :, :pad] = float("nan")
    feats = dict(fq=softmax_feature(q), fk=softmax_feature(k)) if hybrid else {}
    ours, ring = _run_chunks(q, k, v, 3, [5, 1, 6], valid=valid, sinks=sinks, **feats)
    alone_q, alone_k, alone_v = (x[:1, :, pad:] for x in (q, k, v))
    alone = {n: x[:1, :, pad:] for n, x in feats.items()}
    ref, _ = _run_chunks(alone_q, alone_k, alone_v, 3, [8], sinks=sinks, **alone)  # sinks: first *real* tokens
    assert torch.isfinite(ours).all()
    assert rel_rmse(ours[:1, :, pad:], ref) < 1e-12
    for t in ring:
        assert torch.isfinite(t.double()).all()


@pytest.mark.parametrize("groups", [1, 3])
def test_gla_step_is_the_recurrence(groups):
    """Decoding steps of one token continue the naive recurrence exactly, from any state."""
    from linearize.kernels.gla import gla_step
    from linearize.kernels.naive import naive_gla

    q, k, v = _inputs(2, 2 * groups, 2, 6, 8, 5, seed=5)
    g = -torch.rand(2, 2, 6, 8, dtype=q.dtype)
    ref, ref_state = naive_gla(q, k, v, g, 0.7)
    state = torch.zeros(2, 2, 8, 5, dtype=q.dtype)
    outs = []
    for t in range(6):
        o, state = gla_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], g[:, :, t:t + 1], state, 0.7)
        outs.append(o)
    assert rel_rmse(ref, torch.cat(outs, dim=2)) < 1e-12
    assert rel_rmse(ref_state, state) < 1e-12


def _hf_mask(pos0, T, cap, pad=0, B=2):
    """transformers' mask for a StateCache: [B, 1, T, capacity], causal from slot pos0, row 0 left-padded."""
    rows = pos0 + torch.arange(T)[:, None]
    cols = torch.arange(cap)[None, :]
    valid = torch.ones(B, cap, dtype=torch.bool)
    valid[0, :pad] = False
    return ((cols <= rows)[None] & valid[:, None, :])[:, None]


def test_mask_ops_read_and_check_the_cache_mask():
    mask, pos0 = _hf_mask(3, 4, 10, pad=5), torch.tensor(3)
    valid = torch.ops.linearize.chunk_key_validity(mask, pos0, 4)
    assert valid.tolist() == [[False, False, True, True], [True] * 4]
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(torch.ops.linearize.chunk_key_validity(additive, pos0, 4), valid)
    assert bool(torch.ops.linearize.cache_mask_is_causal(mask, pos0))
    assert bool(torch.ops.linearize.cache_mask_is_causal(additive, pos0))
    window = mask & ((pos0 + torch.arange(4)[:, None]) - torch.arange(10)[None, :] < 2)
    assert not bool(torch.ops.linearize.cache_mask_is_causal(window, pos0))  # a sliding window is not supported
    assert not bool(torch.ops.linearize.cache_mask_is_causal(mask, torch.tensor(2)))  # wrong offset
    assert not bool(torch.ops.linearize.cache_mask_is_causal(additive.masked_fill(mask, 0.5), pos0))  # a bias


def test_decoding_ops_pass_opcheck():
    q, k, v = _inputs(2, 6, 3, 5, 8, 4, dtype=torch.float32)
    fq, fk = softmax_feature(q), softmax_feature(k)
    valid, pos0 = torch.ones(2, 5, dtype=torch.bool), torch.tensor(7)
    ring = _empty_ring(2, 3, 4, 8, 4, F=8, dtype=torch.float32)
    ring[2] = torch.tensor([[4, 5, 6, 3]] * 2)
    ops = torch.ops.linearize
    for sink in (_sink_buffers(2, 3, 0, 8, 4, torch.float32), _sink_buffers(2, 3, 2, 8, 4, torch.float32)):
        torch.library.opcheck(ops.ring_window_attention, (q, k, v, valid, pos0, *ring[:3], *sink, 0.5, 4))
        torch.library.opcheck(ops.ring_hybrid_attention, (q, k, v, fq, fk, valid, pos0, *ring, *sink, 0.5, 4))
    mask = _hf_mask(7, 5, 16)
    torch.library.opcheck(ops.chunk_key_validity, (mask, pos0, 5))
    torch.library.opcheck(ops.cache_mask_is_causal, (mask, pos0))
