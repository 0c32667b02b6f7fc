"""pyattn.distributed on spawned CPU process groups (gloo) of 2 and 4 ranks.

Spawning costs seconds per process on the shared 2-core machine, so each group size is spawned
once per module (the ``ring2`` / ``ring4`` fixtures): the ranks run every case of CASES, each rank
checking its own shard against single-process pyattn.reference (float64 truth, the tolerance rule
of tests/helpers.py) on the whole sequence, which every rank draws from the same seed. A case's
failure is recorded (with its traceback) and reported by that case's test. The failure cases
(a rank raising, dying or hanging) each spawn their own group.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import SESSION_SEED, assert_close_to_ref, assert_grads_close

import pyattn
import pyattn.distributed as pd
from pyattn.ops.errors import InputError

# how long a spawned group may take before the test calls it hung (a bound, not a timing check)
SPAWN_TIMEOUT_S = 240
GROUP_TIMEOUT = timedelta(seconds=30)


# -- spawning --------------------------------------------------------------------------------------


def _init(rank: int, P: int, store_path: str, timeout=GROUP_TIMEOUT) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, P)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=P, timeout=timeout)


def _entry(rank: int, target: str, P: int, tmp: str, seed: int, arg) -> None:
    """Run ``target`` on this rank; record its result (or traceback) in tmp/result{rank}.json."""
    out: dict = {}
    try:
        _init(rank, P, os.path.join(tmp, "store"), arg.get("timeout", GROUP_TIMEOUT))
        out = globals()[target](rank, P, seed, arg)
    except BaseException:  # recorded for the parent, then re-raised so the process fails
        out = {"__error__": traceback.format_exc()}
        raise
    finally:
        with open(os.path.join(tmp, f"result{rank}.json"), "w") as f:
            json.dump(out, f)


def spawn(target: str, P: int, tmp_path, arg=None, timeout=SPAWN_TIMEOUT_S) -> tuple[list[dict], list[int]]:
    """Run worker ``target`` on P spawned ranks; (each rank's result dict, exit codes)."""
    tmp = str(tmp_path)
    ctx = mp.start_processes(
        _entry, args=(target, P, tmp, SESSION_SEED, arg or {}), nprocs=P, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} of {target} still running after {timeout} s (a hang)"
    results = []
    for r in range(P):
        path = os.path.join(tmp, f"result{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    return results, [p.exitcode for p in ctx.processes]


# -- the cases every rank runs ------------------------------------------------------------------


def _window_mask(Lq, Lk, causal, window):
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    d = i if causal else i + Lk - Lq
    ok = torch.ones(Lq, Lk, dtype=torch.bool)
    left, right = window
    if left >= 0:
        ok &= j >= d - left
    if right >= 0:
        ok &= j <= d + right
    if causal:
        ok &= j <= i
    return ok


def _ring_case(P, layout="zigzag", causal=False, dtype=torch.float32, B=2, Hq=2, Hkv=2, Lq=24, Lk=None,
               D=16, window=(-1, -1), scale=None):  # fmt: skip
    """One ring_attention check on this rank: output and dq/dk/dv shards vs the whole-sequence
    reference (float64 truth, the reference in ``dtype`` as the rule's baseline)."""
    Lk = Lq if Lk is None else Lk
    q = torch.randn(B, Hq, Lq, D)
    k = torch.randn(B, Hkv, Lk, D)
    v = torch.randn(B, Hkv, Lk, D)
    do = torch.randn(B, Hq, Lq, D)
    mask = None
    is_causal = causal
    if window != (-1, -1):
        mask, is_causal = _window_mask(Lq, Lk, causal, window), False

    def ref(dt):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o = pyattn.reference.scaled_dot_product_attention(
            *xs, mask, is_causal=is_causal, scale=scale, enable_gqa=Hq != Hkv
        )
        return (o, *torch.autograd.grad(o, xs, do.to(dt)))

    ref64, reflow = ref(torch.float64), ref(dtype)
    shard = [pd.shard_sequence(t.to(dtype), 2, layout=layout).requires_grad_() for t in (q, k, v)]
    out = pd.ring_attention(*shard, layout=layout, is_causal=causal, scale=scale, enable_gqa=Hq != Hkv,
                            window_size=window)  # fmt: skip
    grads = torch.autograd.grad(out, shard, pd.shard_sequence(do.to(dtype), 2, layout=layout))
    mine = lambda t: pd.shard_sequence(t, 2, layout=layout)  # noqa: E731
    assert_close_to_ref("out", out, mine(reflow[0]), mine(ref64[0]))
    assert_grads_close(["dq", "dk", "dv"], grads, [mine(g) for g in reflow[1:]], [mine(g) for g in ref64[1:]])
    # the whole output, gathered, is the reference's (shard order undone by unshard)
    whole = pd.unshard_sequence(out.detach(), 2, layout=layout)
    assert_close_to_ref("unsharded out", whole, reflow[0], ref64[0])


def _varlen_case(P, rank, lens, docs, causal, dtype=torch.float32, Hq=2, Hkv=2, D=16):
    """allgather_varlen_attention with documents ``docs`` (lengths) over shards ``lens``."""
    total = sum(lens)
    assert sum(docs) == total
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = torch.randn(total, Hq, D), torch.randn(total, Hkv, D), torch.randn(total, Hkv, D)
    do = torch.randn(total, Hq, D)
    mx = max(docs)

    def ref(dt):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o = pyattn.reference.varlen_attention(*xs, cu, cu, mx, mx, is_causal=causal, enable_gqa=Hq != Hkv)
        return (o, *torch.autograd.grad(o, xs, do.to(dt)))

    ref64, reflow = ref(torch.float64), ref(dtype)
    a = sum(lens[:rank])
    b = a + lens[rank]
    shard = [t[a:b].to(dtype).requires_grad_() for t in (q, k, v)]
    out = pd.allgather_varlen_attention(*shard, cu, is_causal=causal, enable_gqa=Hq != Hkv)
    grads = torch.autograd.grad(out, shard, do[a:b].to(dtype))
    assert_close_to_ref("varlen out", out, reflow[0][a:b], ref64[0][a:b])
    assert_grads_close(["dq", "dk", "dv"], grads, [g[a:b] for g in reflow[1:]], [g[a:b] for g in ref64[1:]])


def _expect(exc_type, fn, *match):
    try:
        fn()
    except exc_type as exc:
        for m in match:
            assert m in str(exc), f"{m!r} not in the error: {exc}"
        return str(exc)
    raise AssertionError(f"no {exc_type.__name__} raised")


def _errors_case(P, rank):
    """Bad inputs: the same clear InputError on every rank, before the ring, and the group still
    works afterwards."""
    x = torch.randn(1, 2, 8, 4)
    # one rank's dtype differs
    qq = x.double() if rank == 1 else x
    _expect(InputError, lambda: pd.ring_attention(qq, qq, qq), "same dtype")
    # zigzag needs a multiple of 2P: shards of 3 rows
    y = torch.randn(1, 2, 3, 4)
    _expect(InputError, lambda: pd.ring_attention(y, y, y), "multiple of")
    # mismatched shard lengths
    z = torch.randn(1, 2, 8 if rank == 0 else 4, 4)
    _expect(InputError, lambda: pd.ring_attention(z, z, z, layout="contiguous"), "shards of")
    # a bad input on one rank only: its own message there, a pointer to it elsewhere
    w = x[0] if rank == 1 else x
    msg = _expect(InputError, lambda: pd.ring_attention(w, w, w), "ring_attention")
    assert ("4-D" in msg) if rank == 1 else ("rank(s) [1]" in msg), msg
    # arguments refused locally on every rank
    _expect(InputError, lambda: pd.ring_attention(x, x, x, window_size=(-2, 0)), "window_size")
    _expect(TypeError, lambda: pd.ring_attention(x, x, x, window_size=(1.5, 0)), "window_size")
    _expect(TypeError, lambda: pd.ring_attention(x, x, x, layout="striped"), "layout")
    # causal across different query/key sequences
    kk = torch.randn(1, 2, 4, 4)
    _expect(InputError, lambda: pd.ring_attention(x, kk, kk, is_causal=True), "same")
    # the group is still usable
    out = pd.ring_attention(x, x, x)
    assert out.shape == x.shape


def _group_of_one_case(P, rank):
    """A group of one (each rank its own) is plain attention, with no communication."""
    mine, _ = dist.new_subgroups(group_size=1)
    q, k, v = (torch.randn(2, 2, 10, 8) for _ in range(3))
    for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (True, (3, 0))):
        out = pd.ring_attention(q, k, v, group=mine, is_causal=causal, window_size=window)
        mask = None if window == (-1, -1) else _window_mask(10, 10, causal, window)
        want = pyattn.scaled_dot_product_attention(q, k, v, mask, is_causal=causal and mask is None)
        torch.testing.assert_close(out, want)


def _shard_case(P, rank):
    """shard_sequence / unshard_sequence round trip, and unshard's gradient (summed over ranks)."""
    for layout, L in (("zigzag", 4 * P), ("contiguous", 3 * P + 1)):
        x = torch.randn(3, L, 2)
        s = pd.shard_sequence(x, 1, layout=layout).clone().requires_grad_()
        whole = pd.unshard_sequence(s, 1, layout=layout)
        torch.testing.assert_close(whole, x, rtol=0, atol=0)
        pos = pd.shard_positions(L, layout=layout)
        torch.testing.assert_close(s.detach(), x[:, pos])
        whole.backward(torch.ones_like(whole) * (rank + 1))
        torch.testing.assert_close(s.grad, torch.full_like(s, P * (P + 1) / 2))


# per group size: (shard lengths, document lengths) twice; documents cross shard edges, some
# shards and documents are empty
VARLEN = {
    2: ([9, 7], [5, 8, 3], [11, 0], [2, 9]),
    4: ([9, 7, 12, 5], [3, 10, 0, 6, 1, 10, 3], [11, 0, 6, 9], [7, 4, 0, 15]),
}


def _model_grads(model, loss, group_sum):
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads, strict=True)]
    if group_sum:
        for g in grads:
            dist.all_reduce(g)
    return grads


def _assert_model_close(name, a, b):
    # float64 models: the ring's merge and the whole-sequence kernel round differently, a few ulp
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


def _bert_case(P, rank, layout, L):
    """BertForPreTraining under context parallelism: loss (summed over ranks) and every
    parameter gradient (summed over ranks) equal the single-process ones."""
    from pyattn.models.bert import BertConfig, BertForPreTraining

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertForPreTraining(cfg).double()
    ids = torch.randint(6, 40, (2, L))
    types = (torch.arange(L) >= L // 2).long().expand(2, L)
    labels = torch.where(torch.rand(2, L) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 1] = ids[:, 1]
    nsp = torch.randint(0, 2, (2,))
    whole = model(ids, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    want = _model_grads(model, whole.loss, False)
    model.set_context_parallel(dist.group.WORLD, layout)
    sh = lambda t: pd.shard_sequence(t, 1, layout=layout)  # noqa: E731
    part = model(sh(ids), token_type_ids=sh(types), labels=sh(labels), next_sentence_label=nsp)
    got = _model_grads(model, part.loss, True)
    loss = part.loss.detach().clone()
    dist.all_reduce(loss)
    _assert_model_close("loss", loss, whole.loss.detach())
    _assert_model_close("MLM logits", part.prediction_logits, sh(whole.prediction_logits))
    assert (part.seq_relationship_logits is None) == (rank != 0)
    for (n, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        _assert_model_close(f"grad {n}", g, w)


def _transformer_case(P, rank, layout):
    """The encoder-decoder Transformer under context parallelism (encoder, causal decoder and
    cross-attention as rings): output shards and summed gradients equal the single-process ones."""
    from pyattn.models.transformer import Transformer

    model = Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                        dropout=0.0, batch_first=True).double()  # fmt: skip
    S, T = 8 * P, 4 * P
    src, tgt = torch.randn(2, S, 16, dtype=torch.float64), torch.randn(2, T, 16, dtype=torch.float64)
    w = torch.randn(2, T, 16, dtype=torch.float64)
    mask = Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    whole = model(src, tgt, tgt_mask=mask, tgt_is_causal=True)
    want = _model_grads(model, (whole * w).sum(), False)
    model.set_context_parallel(dist.group.WORLD, layout)
    sh = lambda t: pd.shard_sequence(t, 1, layout=layout)  # noqa: E731
    part = model(sh(src), sh(tgt), tgt_is_causal=True)
    got = _model_grads(model, (part * sh(w)).sum(), True)
    _assert_model_close("output", part, sh(whole))
    for (n, _), g, ww in zip(model.named_parameters(), got, want, strict=True):
        _assert_model_close(f"grad {n}", g, ww)


def _per_head_rings(fn):
    """``fn`` with the ring run once per kv head (ring.CHUNK_BYTES = 0), as on long shards."""
    from pyattn.distributed import ring

    saved, ring.CHUNK_BYTES = ring.CHUNK_BYTES, 0
    try:
        fn()
    finally:
        ring.CHUNK_BYTES = saved


def _cases(P):
    c = {
        "zigzag_causal": lambda r: _ring_case(P, "zigzag", True),
        "zigzag_full": lambda r: _ring_case(P, "zigzag", False),
        "contiguous_causal": lambda r: _ring_case(P, "contiguous", True),
        "contiguous_full": lambda r: _ring_case(P, "contiguous", False, scale=0.3),
        "contiguous_uneven_causal": lambda r: _ring_case(P, "contiguous", True, Lq=4 * P + 3, D=7),
        "cross_attention": lambda r: _ring_case(P, "zigzag", False, Lq=4 * P, Lk=8 * P),
        "gqa_causal": lambda r: _ring_case(P, "zigzag", True, Hq=4, Hkv=2),
        "gqa_per_head_rings": lambda r: _per_head_rings(
            lambda: _ring_case(P, "zigzag", True, B=1, Hq=6, Hkv=3, window=(7, 0), Lq=8 * P)
        ),
        "bf16_causal": lambda r: _ring_case(P, "zigzag", True, dtype=torch.bfloat16, Lq=16 * P),
        "bf16_contiguous": lambda r: _ring_case(P, "contiguous", False, dtype=torch.bfloat16, Lq=16 * P),
        "window_causal": lambda r: _ring_case(P, "zigzag", True, Lq=16 * P, window=(5, 0)),
        "window_both_sides": lambda r: _ring_case(P, "contiguous", False, Lq=8 * P + 1, window=(3, 6)),
        "window_zigzag_gqa": lambda r: _ring_case(P, "zigzag", False, Lq=8 * P, Hq=4, Hkv=1, window=(2, 9)),
        "varlen_causal": lambda r: _varlen_case(P, r, VARLEN[P][0], VARLEN[P][1], True),
        "varlen_full_gqa": lambda r: _varlen_case(P, r, VARLEN[P][2], VARLEN[P][3], False, Hq=4, Hkv=2),
        "varlen_bf16": lambda r: _varlen_case(
            P, r, [16] * P, [5, 11 * P + 3, 5 * P - 8], True, dtype=torch.bfloat16
        ),
        "model_bert_zigzag": lambda r: _bert_case(P, r, "zigzag", 6 * P),
        "model_bert_contiguous_uneven": lambda r: _bert_case(P, r, "contiguous", 5 * P + 1),
        "model_transformer": lambda r: _transformer_case(P, r, "zigzag"),
        "errors": lambda r: _errors_case(P, r),
        "shard_unshard": lambda r: _shard_case(P, r),
    }
    if P == 2:
        c["group_of_one"] = lambda r: _group_of_one_case(P, r)
    return c


def run_cases(rank, P, seed, arg):
    results = {}
    for i, (name, fn) in enumerate(_cases(P).items()):
        torch.manual_seed(seed * 1009 + i)  # the same on every rank: each draws the whole inputs
        try:
            fn(rank)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        dist.barrier()
    return results


# -- the tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ring2(tmp_path_factory):
    return _spawned(2, tmp_path_factory.mktemp("ring2"))


@pytest.fixture(scope="module")
def ring4(tmp_path_factory):
    return _spawned(4, tmp_path_factory.mktemp("ring4"))


def _spawned(P, tmp):
    results, codes = spawn("run_cases", P, tmp)
    for r, res in enumerate(results):
        assert "__error__" not in res, f"rank {r} of {P} failed outside the cases:\n{res['__error__']}"
    assert codes == [0] * P, f"exit codes {codes}"
    return results


def _check(results, name):
    bad = {r: res.get(name, "not run") for r, res in enumerate(results) if res.get(name) != "ok"}
    assert not bad, "\n".join(f"rank {r} (PYATTN_TEST_SEED={SESSION_SEED}):\n{msg}" for r, msg in bad.items())


@pytest.mark.parametrize("name", list(_cases(2)))
def test_two_ranks(ring2, name):
    _check(ring2, name)


@pytest.mark.parametrize("name", list(_cases(4)))
def test_four_ranks(ring4, name):
    _check(ring4, name)


def test_case_lists_cover_the_issue():
    """Both group sizes run the attention cases (a case dropped from one list would pass
    vacuously otherwise)."""
    two, four = set(_cases(2)), set(_cases(4))
    want = {"zigzag_causal", "contiguous_causal", "bf16_causal", "varlen_causal", "model_bert_zigzag"}
    assert four <= two and want <= four


def test_single_process_without_torch_distributed():
    """No process group: ring_attention is plain fused attention, shard/unshard the identity."""
    assert not dist.is_initialized()
    q, k, v = (torch.randn(1, 2, 12, 8, requires_grad=True) for _ in range(3))
    out = pd.ring_attention(q, k, v, is_causal=True)
    want = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
    assert pd.shard_sequence(q, 2) is q and pd.unshard_sequence(q, 2) is q
    with pytest.raises(InputError, match="dim"):
        pd.shard_sequence(q, 4)


def test_import_pyattn_leaves_distributed_unloaded(tmp_path):
    """``import pyattn`` does not import pyattn.distributed (no torch.distributed side effects)."""
    import subprocess
    import sys

    code = "import sys, pyattn; print('pyattn.distributed' in sys.modules)"
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert got.stdout.strip() == "False", got.stdout + got.stderr


# -- failures: a rank raising, dying or hanging makes the others raise (bounded time) ---------------


def fail_worker(rank, P, seed, arg):
    from pyattn.distributed import ring

    how = arg["how"]
    x = torch.randn(1, 2, 4 * P, 8)
    if rank == 1:
        if how == "dies":
            os._exit(3)
        if how == "hangs":
            time.sleep(arg["sleep"])
            return {}
        if how == "raises":

            def broken(*a, **k):
                raise RuntimeError("injected failure on rank 1")

            ring._Ring.exchange = broken
    shard = [pd.shard_sequence(x, 2).requires_grad_() for _ in range(3)]
    t0 = time.monotonic()
    try:
        out = pd.ring_attention(*shard, is_causal=True)
        out.sum().backward()
    except pd.RingError as exc:
        return {"raised": "RingError", "msg": str(exc), "seconds": time.monotonic() - t0}
    return {"raised": None}


@pytest.mark.parametrize("how", ["raises", "dies", "hangs"])
def test_failing_rank_makes_the_others_raise(tmp_path, how):
    P = 3 if how == "raises" else 2
    arg = {"how": how}
    if how == "hangs":
        arg.update(timeout=timedelta(seconds=5), sleep=12)
    results, codes = spawn("fail_worker", P, tmp_path, arg, timeout=60)
    assert codes[1] != 0 or how == "hangs", f"rank 1 should have failed, exit codes {codes}"
    others = [r for r in range(P) if r != 1]
    for r in others:
        res = results[r]
        assert res.get("raised") == "RingError", f"rank {r}: {res}"
        assert "rank" in res["msg"] and "failed" in res["msg"], res["msg"]
    # the neighbour that waits on rank 1 raises; with 3 ranks the third may also wait on rank 1's
    # neighbour, so every surviving rank ends with a RingError, none hangs (spawn's bound)
    assert math.isfinite(max(results[r]["seconds"] for r in others))


# -- the step plans, without processes ---------------------------------------------------------------


def _visible_pairs(P, L, layout, causal=True, window=(-1, -1)):
    """Per rank: the (query, key) pairs its kernels compute over the ring, and the skipped steps."""
    from pyattn.distributed import _layout
    from pyattn.distributed._blocks import plan_block

    work, skipped = [], []
    for r in range(P):
        q = _layout.positions(L, P, r, layout)
        total, skip = 0, 0
        for s in range(P):
            blk = plan_block(q, _layout.positions(L, P, (r - s) % P, layout), causal, window, 0)
            if blk is None:
                skip += 1
                continue
            n = (blk.q1 - blk.q0) * (blk.k1 - blk.k0)
            total += n if blk.causal == 0 else (blk.q1 - blk.q0) * (blk.q1 - blk.q0 + 1) // 2
        work.append(total)
        skipped.append(skip)
    return work, skipped


def test_zigzag_balances_causal_work():
    """Under causal attention every zigzag rank computes the same number of pairs (the contiguous
    cut gives the last rank the most), and the ranks together compute exactly the causal pairs:
    blocks are cut to their visible rows and keys."""
    P, L = 4, 64
    zig, _ = _visible_pairs(P, L, "zigzag")
    contiguous, _ = _visible_pairs(P, L, "contiguous")
    assert len(set(zig)) == 1, zig
    assert contiguous == sorted(contiguous) and contiguous[-1] > 2 * contiguous[0], contiguous
    assert sum(zig) == sum(contiguous) == L * (L + 1) // 2


def test_window_skips_steps_outside_it():
    """A causal window of 3 keys on contiguous shards of 8: each rank computes its own shard and
    the previous shard's last keys only; the other steps are skipped (no kernel call)."""
    work, skipped = _visible_pairs(4, 32, "contiguous", window=(3, 0))
    assert skipped == [3, 2, 2, 2], skipped
    # own shard: the band within it needs a mask over 8 x 8; the previous shard: rows 0..2 of
    # this one against its last 3 keys
    assert work == [64, 64 + 9, 64 + 9, 64 + 9], work
