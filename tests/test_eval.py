"""The evaluation is exact and legal: every target scored once (C4), by a distribution that is causal
(C1), normalized (C2) and fixed before the target is looked at (C3). These tests check the sliding
window plan, `evaluate` under batch sizes and simulated world sizes, the fast n-gram tables against a
slow dictionary reference, the normalization audit (and that it can fail), causality, the dump, the
2-process path and the refusal to report a partial score."""
from __future__ import annotations

import contextlib
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata

import numpy as np
import pytest
import torch

import eval_dump
import train_gpt
from conftest import SCRIPT, command, contract_record, finals, script_env, tiny_args


# ----------------------------------------------------------------------------------------------
# Helpers written for the tests


class FakeRuntime:
    """Stands in for train_gpt.Runtime: one simulated rank of `world_size`, on the CPU. all_reduce is
    the identity (each rank's sums are summed by the test) but keeps a copy of what it was given."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cpu")
        self.is_cuda = False
        self.master = rank == 0
        self.reduced: list[torch.Tensor] = []

    def autocast(self):
        return contextlib.nullcontext()

    def sync(self):
        pass

    def all_reduce(self, t, op=None):
        self.reduced.append(t.detach().clone())
        return t

    def gather_objects(self, obj):
        return [obj]

    def upload(self, t):
        return t


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices on a shared 2-core machine: extra threads only contend. Restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def quiet(*_a, **_k):
    pass


def random_model(seed: int) -> train_gpt.GPT:
    """A tiny GPT whose every weight is random (the zero-initialised projections and bigram table too),
    so each prediction depends on the whole visible context, not only on the last token or two."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(tiny_args())
    with torch.no_grad():
        for name, p in model.named_parameters():  # the scales and gains stay (a vector per pass)
            if p.dim() >= 2 and not name.endswith(("attn_scale", "mlp_scale", "q_gain")):
                std = 0.3 if name == "tok_emb.weight" else 1.0 / math.sqrt(p.shape[-1])
                p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="module")
def luts(corpus):
    sp = train_gpt.load_tokenizer(corpus["tokenizer"], corpus["vocab_size"])
    return tuple(torch.from_numpy(a) for a in train_gpt.byte_luts(sp))


def run_eval(model, val, luts, args, world_size, seq_len, stride, ngram=None, deadline=0):
    """The pass as `world_size` simulated ranks, each scoring its own windows into its buffer; the
    buffers summed as the all-reduce sums them; then the stream scores and, with tables, the mixture.
    The per-rank buffers are kept under "parts"."""
    t0 = time.perf_counter()
    parts = [train_gpt.score_windows(model, val, args, FakeRuntime(r, world_size), seq_len=seq_len,
                                     stride=stride, deadline=train_gpt.Deadline(deadline)) for r in range(world_size)]
    res = train_gpt.stream_scores(torch.stack(parts).sum(0), val, luts, t0)
    res = train_gpt.ngram_mixture(res, ngram, args) if ngram is not None and res["complete"] else res
    return dict(res, parts=parts)


def dump_of(res, val, tables=None) -> dict:
    """What tools/eval_dump.py would write for this result, through its write_dump into a temporary file."""
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/dump.npz"
        eval_dump.write_dump(path, val, res, tables)
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


def my_window_end(p: int, n_tokens: int, seq_len: int, stride: int) -> int:
    """Independent closed form: the first window ends at min(seq_len, N-1); later ones every `stride`
    tokens after it, the last one clipped to N-1. Target p is scored by the first window ending >= p."""
    last = n_tokens - 1
    first = min(seq_len, last)
    if p <= first:
        return first
    return min(last, first + -(-(p - first) // stride) * stride)


def slow_ngram(tokens: list[int], min_order: int, max_order: int, min_count: int, keep_dists_at=()):
    """Reference n-gram backoff in plain dicts, one position at a time: choose the order and read
    p(x_t), c(ctx) and max_v c(ctx, v) from counts of earlier positions only, then add position t."""
    ctx_count = {n: {} for n in range(min_order, max_order + 1)}
    joint_count = {n: {} for n in range(min_order, max_order + 1)}
    top_count = {n: {} for n in range(min_order, max_order + 1)}
    orders, probs, dists = [0] * len(tokens), [0.0] * len(tokens), {}
    counts, tops = [0] * len(tokens), [0] * len(tokens)
    for t in range(len(tokens)):
        x = tokens[t]
        for n in range(max_order, min_order - 1, -1):
            if t < n - 1:
                continue
            ctx = tuple(tokens[t - n + 1:t])
            c = ctx_count[n].get(ctx, 0)
            if c >= min_count:
                orders[t], counts[t], tops[t] = n, c, top_count[n][ctx]
                probs[t] = joint_count[n].get((ctx, x), 0) / c
                if t in keep_dists_at:
                    dists[t] = {v: k / c for (cx, v), k in joint_count[n].items() if cx == ctx}
                break
        for n in range(min_order, max_order + 1):  # update after scoring
            if t >= n - 1:
                ctx = tuple(tokens[t - n + 1:t])
                ctx_count[n][ctx] = ctx_count[n].get(ctx, 0) + 1
                joint_count[n][(ctx, x)] = joint_count[n].get((ctx, x), 0) + 1
                top_count[n][ctx] = max(top_count[n].get(ctx, 0), joint_count[n][(ctx, x)])
    return np.array(orders), np.array(probs), dists, np.array(counts), np.array(tops)


def ngram_args(min_order=2, max_order=7, min_count=2):
    return tiny_args(NGRAM_MIN_ORDER=min_order, NGRAM_MAX_ORDER=max_order, NGRAM_MIN_COUNT=min_count)


def my_alpha(entropy, base=0.05, rng=0.55, scale=2.0, thresh=4.0):
    return base + rng / (1.0 + np.exp(-scale * (np.asarray(entropy, dtype=np.float64) - thresh)))


def val_tokens(corpus) -> np.ndarray:
    paths = train_gpt.find_shards(corpus["path"], "val")
    return np.concatenate([train_gpt.shard_tokens(p) for p in paths]).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# 1. The window plan covers every target exactly once


def plan_cases():
    cases = [(2, 64, 16), (2, 1, 1), (3, 2, 1), (3, 64, 64), (40, 64, 16), (64, 64, 16), (65, 64, 16),
             (66, 64, 16), (1001, 64, 16), (1001, 64, 64), (1001, 64, 1), (1000, 7, 3), (97, 16, 5),
             (129, 64, 64), (130, 64, 64), (500, 1, 1), (17, 4, 4), (2049, 2048, 64), (5000, 2048, 64)]
    rng = np.random.default_rng(1)
    for _ in range(300):
        seq_len = int(rng.integers(1, 80))
        stride = int(rng.integers(1, seq_len + 1))
        n = int(rng.integers(2, 400))
        cases.append((n, seq_len, stride))
    return cases


def test_window_plan_partitions_targets_exactly_once():
    for n, seq_len, stride in plan_cases():
        ends = train_gpt.window_plan(n, seq_len, stride).tolist()
        case = (n, seq_len, stride)
        scored, prev = [], 0
        for w, end in enumerate(ends):
            assert end > prev, (case, ends)  # every window scores at least one target
            start = max(0, end - seq_len)
            assert 0 < end - start <= seq_len, case
            if w > 0:
                assert end - prev <= stride, (case, w, prev, end)
                if n - 1 >= seq_len:  # a later window always sees a full seq_len of context
                    assert end - start == seq_len, case
            # each target p in (prev, end] is predicted from input position p-1 inside [start, end)
            assert start <= prev, case
            scored.extend(range(prev + 1, end + 1))
            prev = end
        assert scored == list(range(1, n)), case
        for p in {1, n - 1, n // 2, max(1, n - stride)}:
            assert ends[np.searchsorted(ends, p)] == my_window_end(p, n, seq_len, stride), (case, p)


def test_window_plan_first_window_scores_all_its_positions():
    ends = train_gpt.window_plan(1000, 64, 16)
    assert int(ends[0]) == 64 and int(ends[1]) == 80 and int(ends[-1]) == 999
    assert train_gpt.window_plan(30, 64, 16).tolist() == [29]
    assert train_gpt.window_plan(2, 64, 16).tolist() == [1]


# ----------------------------------------------------------------------------------------------
# 2. Coverage through evaluate, for several batch sizes and world sizes


@pytest.fixture(scope="module")
def eval_setup(luts):
    torch.manual_seed(7)
    n = 1237  # not a multiple of the stride, the window or any batch
    val = torch.randint(0, 512, (n,), dtype=torch.int64)
    val[::97] = train_gpt.BOS_ID
    model = random_model(3)
    tables = train_gpt.ngram_tables(val, 512, 2, 7, 2)
    return model, val, tables


def check_full_coverage(res, n):
    """Each simulated rank scored a disjoint set of positions; together every target 1..n-1 exactly once."""
    owned = [p[:-1].view(len(train_gpt.SCORE_ROWS), n)[3] for p in res["parts"]]
    assert all(bool(((o == 0) | (o == 1)).all()) for o in owned)
    total = torch.stack(owned).sum(0)
    assert float(total[0]) == 0 and bool((total[1:] == 1).all())
    assert res["tokens"] == n - 1 and res["coverage"] == 1.0 and res["complete"]


@pytest.mark.parametrize("seq_len,stride", [(64, 16), (64, 64), (32, 1)])
def test_evaluate_coverage_independent_of_batch_and_world_size(eval_setup, luts, seq_len, stride):
    model, val, tables = eval_setup
    n = len(val) if stride > 1 else 300
    val = val[:n]
    tables = train_gpt.NgramTables(*(t[:n] for t in tables))  # prefix counts: the first n entries are val[:n]'s
    configs = [(16, 1), (1, 1), (7, 1), (16, 2), (7, 3), (3, 5)] if stride > 1 else [(16, 1), (5, 3)]
    ref = None
    base, space, boundary = (a.numpy() for a in luts)
    v = val.numpy()
    my_bytes = int((base[v[1:]] + (space[v[1:]] & ~boundary[v[:-1]])).sum())
    for bsz, world in configs:
        args = tiny_args(EVAL_BATCH_SEQS=bsz, NGRAM_MIX_FIRST=64, NGRAM_MIX_CHUNK=128)
        res = run_eval(model, val, luts, args, world, seq_len, stride, ngram=tables)
        check_full_coverage(res, n)
        d = dump_of(res, val, tables)
        assert np.array_equal(d["pos"], np.arange(1, n)) and np.array_equal(d["target"], v[1:])
        assert res["loss_model"] == pytest.approx(d["nll_model"].mean(), rel=1e-12)
        assert res["loss_mixed"] == pytest.approx(d["nll_mixed"].mean(), rel=1e-12)
        assert res["bytes"] == my_bytes
        assert res["bpb_model"] == pytest.approx(d["nll_model"].sum() / math.log(2) / my_bytes, rel=1e-12)
        if ref is None:
            ref = (res, d)
            continue
        # any batch size, any world size: the same per-target scores, so the same mixture and the same sums
        for key in ("nll_model", "nll_mixed", "entropy", "top_p", "alpha"):
            np.testing.assert_allclose(d[key], ref[1][key], rtol=0, atol=1e-9, err_msg=f"{key} {bsz} {world}")
        for key in ("order", "target", "count", "top"):
            assert np.array_equal(d[key], ref[1][key])
        assert res["loss_mixed"] == pytest.approx(ref[0]["loss_mixed"], rel=1e-12)


def test_evaluate_scores_each_target_from_its_window_context(eval_setup, luts):
    """Recompute sampled targets directly: model on tokens [end - seq_len, end) of the window that
    (by the closed form above) scores p, read at input position p - 1."""
    model, val, tables = eval_setup
    n, seq_len, stride = len(val), 64, 16
    d = dump_of(run_eval(model, val, luts, tiny_args(EVAL_BATCH_SEQS=8), 2, seq_len, stride, ngram=tables), val, tables)
    rng = np.random.default_rng(0)
    picks = sorted({1, 2, 63, 64, 65, 80, 81, n - 2, n - 1, *rng.integers(1, n, 25).tolist()})
    with torch.no_grad():
        for p in picks:
            end = my_window_end(p, n, seq_len, stride)
            start = max(0, end - seq_len)
            h = model.hidden(val[start:end][None])[0, p - 1 - start]  # the head in float64, as the eval's
            logp = torch.log_softmax(model.logits(h, torch.float64), -1)
            i = p - 1
            assert d["pos"][i] == p
            assert d["nll_model"][i] == pytest.approx(-float(logp[val[p]]), abs=1e-5)
            assert d["entropy"][i] == pytest.approx(-float((logp.exp() * logp).sum()), abs=1e-5)
            assert d["top_p"][i] == pytest.approx(float(logp.exp().max()), abs=1e-6)


def test_dump_without_ngram_covers_every_target(eval_setup, luts):
    """tools/eval_dump.py with NGRAM=0: every target, no n-gram anywhere, the mixed column the model's."""
    model, val, _ = eval_setup
    res = run_eval(model, val, luts, tiny_args(NGRAM=0), 2, 64, 16)
    d = dump_of(res, val)
    assert np.array_equal(d["pos"], np.arange(1, len(val)))
    assert (d["order"] == 0).all() and np.isnan(d["p_ng"]).all() and np.isnan(d["alpha"]).all()
    assert np.array_equal(d["nll_mixed"], d["nll_model"]) and d["nll_model"].mean() == pytest.approx(res["loss_model"])


@pytest.mark.parametrize("n", [2, 3, 40, 65])
def test_evaluate_short_streams_more_ranks_than_windows(luts, n):
    torch.manual_seed(n)
    val = torch.randint(0, 512, (n,), dtype=torch.int64)
    model = random_model(1)
    tables = train_gpt.ngram_tables(val, 512, 2, 7, 2)
    ref = None
    for world in (1, 2, 3):
        res = run_eval(model, val, luts, tiny_args(EVAL_BATCH_SEQS=4), world, 64, 16, ngram=tables)
        check_full_coverage(res, n)
        if ref is None:
            ref = res
        else:
            assert res["loss_mixed"] == pytest.approx(ref["loss_mixed"], abs=1e-12)


def records_of(res, tables, picks):
    """(t, p(x_t), order) as the fast path scored them: what run_audit checks."""
    return [(t, math.exp(-float(res["nll_mixed"][t])), int(tables.order[t])) for t in picks]


@pytest.mark.parametrize("mixer", ["learned", "fixed"])
def test_evaluate_records_pass_the_audit(eval_setup, luts, mixer):
    """The independent rebuild of the whole mixed distribution, features and alpha included, agrees
    with the fast path's mixed stream at the sampled positions; the learned weights moved."""
    model, val, tables = eval_setup
    args = tiny_args(EVAL_BATCH_SEQS=6, NGRAM_MIXER=mixer, NGRAM_MIX_FIRST=64, NGRAM_MIX_CHUNK=256)
    picks = train_gpt.audit_positions(tables.order, 40, 0)
    assert sum(int(tables.order[t]) > 0 for t in picks) >= 20
    res = run_eval(model, val, luts, args, 3, 64, 16, ngram=tables)
    assert res["mixer"].learn == (mixer == "learned")
    if res["mixer"].learn:
        assert len(res["mixer"].weights) >= 4 and float(res["mixer"].weights[-1].abs().max()) > 0.1
    records = records_of(res, tables, picks)
    rows = train_gpt.audit_model_logp(model, val, picks, args, FakeRuntime())
    rep = train_gpt.audit_ngram(records, rows, val, 512, args, res["mixer"].alpha_at)
    assert rep["positions"] == len(picks) and rep["order_mismatch"] == 0
    assert rep["max_sum_err"] <= 1e-6 and rep["max_target_err"] <= 1e-9
    for world in (1, 3):  # run_audit splits the positions over ranks and merges the reports
        ranks = [FakeRuntime(r, world) for r in range(world)]
        parts = [train_gpt.run_audit(model, val, res, tables, train_gpt.audit_share(picks, rt), args, rt,
                                     train_gpt.Deadline(0)) for rt in ranks]
        assert sum(p["positions"] for p in parts) == len(picks)
        assert all(p["max_target_err"] <= 1e-9 and not p["late"] for p in parts)


def test_audit_model_rows_see_only_the_prefix(eval_setup):
    """The audit's model row for t equals a plain forward of only the tokens before t (from the start
    of t's window), and changing x_t or anything after it leaves it bitwise unchanged."""
    model, val, _ = eval_setup
    n, args = len(val), tiny_args(EVAL_BATCH_SEQS=4)
    cut = 402
    positions = [1, 2, 63, 64, 65, 80, 81, 400, cut, cut + 1, n - 2, n - 1]
    rows = train_gpt.audit_model_logp(model, val, positions, args, FakeRuntime())
    changed = val.clone()
    changed[cut:] = (changed[cut:] * 7 + 3) % 512  # x_t and everything after it, for t = cut
    rows_changed = train_gpt.audit_model_logp(model, changed, positions, args, FakeRuntime())
    with torch.no_grad():
        for i, t in enumerate(positions):
            start = max(0, my_window_end(t, n, 64, 16) - 64)
            h = model.hidden(val[start:t][None])[0, -1]
            want = torch.log_softmax(model.logits(h, torch.float64), -1)
            assert torch.allclose(rows[i], want, atol=1e-5), t
            assert torch.equal(rows[i], rows_changed[i]) == (t <= cut), t  # later rows see the change


def leak_patches(monkeypatch, kind):
    """Two ways a fast path can see the token it scores: attention that is not causal, and a head
    read one position too late (at the target's own input position)."""
    if kind == "non_causal_attention":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(train_gpt.F, "scaled_dot_product_attention",
                            lambda q, k, v, is_causal, **kw: sdpa(q, k, v, is_causal=False, **kw))
    elif kind == "head_one_position_late":
        real = train_gpt.eval_logprobs
        monkeypatch.setattr(train_gpt, "eval_logprobs", lambda m, fn, x, rows, rt: real(
            m, fn, x, torch.clamp(rows + 1, max=x.numel() - 1), rt))


def test_audit_passes_with_long_orders(luts):
    """Orders up to 16 through the whole eval: the tables, the learned mixer and the audit's brute force."""
    torch.manual_seed(5)
    val = torch.randint(0, 512, (900,), dtype=torch.int64)
    val[350:600] = val[100:350]
    val[600:850] = val[100:350]  # the third copy sees each 15-token context twice before
    args = tiny_args(EVAL_BATCH_SEQS=6, NGRAM_MAX_ORDER=16, NGRAM_MIX_FIRST=64)
    tables = train_gpt.ngram_tables(val, 512, 2, 16, 2)
    assert int((tables.order == 16).sum()) > 200
    model = random_model(4)
    res = run_eval(model, val, luts, args, 2, 64, 16, ngram=tables)
    picks = train_gpt.audit_positions(tables.order, 40, 0)
    assert sum(int(tables.order[t]) == 16 for t in picks) >= 5
    rep = train_gpt.run_audit(model, val, res, tables, picks, args, FakeRuntime(), train_gpt.Deadline(0))
    assert rep["positions"] == len(picks) and rep["order_mismatch"] == 0
    assert rep["max_sum_err"] <= 1e-6 and rep["max_target_err"] <= 1e-9


@pytest.mark.parametrize("kind", [None, "non_causal_attention", "head_one_position_late"])
def test_audit_fails_on_a_fast_path_that_sees_the_target(eval_setup, luts, monkeypatch, kind):
    model, val, tables = eval_setup
    if kind:
        leak_patches(monkeypatch, kind)
    args = tiny_args(EVAL_BATCH_SEQS=6, NGRAM_MIX_FIRST=64)
    picks = train_gpt.audit_positions(tables.order, 40, 1)
    res = run_eval(model, val, luts, args, 1, 64, 16, ngram=tables)
    rep = train_gpt.run_audit(model, val, res, tables, picks, args, FakeRuntime(), train_gpt.Deadline(0))
    assert rep["positions"] == len(picks) and rep["max_sum_err"] <= 1e-6 and not rep["late"]
    if kind is None:
        assert rep["max_target_err"] <= 1e-12
    else:
        assert rep["max_target_err"] > 1e-3, rep


def test_audit_positions_are_seeded_spread_and_small(eval_setup):
    import tracemalloc
    _, val, tables = eval_setup
    order = tables.order
    picks = train_gpt.audit_positions(order, 40, 0)
    assert len(picks) == len(set(picks)) and picks == train_gpt.audit_positions(order, 40, 0)
    assert picks != train_gpt.audit_positions(order, 40, 1)
    assert all(1 <= t < len(val) for t in picks) and 30 <= len(picks) <= 40
    assert sum(int(order[t]) > 0 for t in picks) >= 20  # the matched half, plus matches drawn uniformly
    assert sorted(train_gpt.audit_positions(order[:3], 40, 0)) == [1, 2]  # fewer targets than asked: all of them
    # host memory independent of the stream length (62M targets on 8 ranks must not cost GBs each)
    big = torch.zeros(4_000_000, dtype=torch.int8)
    big[::3] = 2
    tracemalloc.start()
    picks = train_gpt.audit_positions(big, 256, 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(picks) >= 200 and sum(int(big[t]) > 0 for t in picks) >= 128
    assert peak < 200_000, peak


def test_evaluate_expired_deadline_is_incomplete(eval_setup, luts):
    model, val, tables = eval_setup
    res = run_eval(model, val, luts, tiny_args(EVAL_BATCH_SEQS=4), 1, 64, 16, ngram=tables, deadline=1e-9)
    assert not res["complete"] and res["coverage"] < 1
    assert "INCOMPLETE" in train_gpt.final_line("sliding", res) and "val_bpb" not in train_gpt.final_line("sliding", res)


# ----------------------------------------------------------------------------------------------
# 3. The fast n-gram tables equal a slow dictionary reference, position by position


@pytest.mark.parametrize("vocab,n,min_order,max_order,min_count,seed", [
    (3, 3000, 2, 7, 2, 0), (3, 3000, 2, 7, 1, 1), (3, 3000, 3, 7, 3, 2), (2, 2000, 2, 12, 2, 3),
    (1000, 5000, 2, 7, 2, 4), (1000, 5000, 2, 7, 1, 5), (1000, 5000, 3, 5, 3, 6), (50, 4000, 2, 7, 2, 7),
    (7, 1, 2, 7, 2, 8), (7, 2, 2, 7, 1, 9), (5, 9, 2, 7, 1, 10), (4, 500, 4, 4, 1, 11),
])
def test_ngram_tables_match_slow_reference(vocab, n, min_order, max_order, min_count, seed):
    rng = np.random.default_rng(seed)
    if vocab >= 50:  # phrases from a small phrase book, between fresh random tokens: long contexts recur
        book = [rng.integers(0, vocab, int(rng.integers(3, 12))) for _ in range(60)]
        pieces, size = [], 0
        while size < n:
            piece = book[int(rng.integers(0, len(book)))] if rng.random() < 0.7 else rng.integers(0, vocab, 2)
            pieces.append(piece)
            size += len(piece)
        toks = np.concatenate(pieces)[:n]
    else:
        toks = rng.integers(0, vocab, n)
    toks = toks.tolist()
    order, p_ng, count, top = train_gpt.ngram_tables(torch.tensor(toks, dtype=torch.int64), vocab, min_order,
                                                     max_order, min_count)
    assert len(order) == len(p_ng) == len(count) == len(top) == n
    ref_order, ref_p, _, ref_count, ref_top = slow_ngram(toks, min_order, max_order, min_count)
    order = order.to(torch.int64).numpy()
    assert order[0] == 0
    mismatch = np.nonzero(order != ref_order)[0]
    assert len(mismatch) == 0, f"first order mismatch at {mismatch[:5]}: fast {order[mismatch[:5]]} ref {ref_order[mismatch[:5]]}"
    m = ref_order > 0
    np.testing.assert_allclose(p_ng.numpy()[m], ref_p[m], rtol=0, atol=1e-12)
    assert np.array_equal(count.numpy(), ref_count) and np.array_equal(top.numpy(), ref_top)
    if n >= 1000:  # the cases are not vacuous: many matches, including the deepest order
        assert m.mean() > 0.3 and (ref_order == max_order).any()
        assert (ref_p[m] == 0).any() and (ref_p[m] == 1).any() and ((ref_p[m] > 0) & (ref_p[m] < 1)).any()


def test_ngram_tables_distinct_contexts_never_share_counts():
    """Contexts that collide under a lossy key (e.g. a*V+b with overflow or buckets) must stay apart:
    a vocabulary of 65536 and contexts that differ only in their oldest token."""
    vocab = 65536
    toks = []
    rng = np.random.default_rng(0)
    for i in range(400):
        toks += [int(rng.integers(0, vocab)), 5, 6, 7, 8, 9, 10, int(rng.integers(0, 3))]
    order, p_ng, count, top = train_gpt.ngram_tables(torch.tensor(toks), vocab, 2, 7, 2)
    ref_order, ref_p, _, ref_count, ref_top = slow_ngram(toks, 2, 7, 2)
    assert np.array_equal(count.numpy(), ref_count) and np.array_equal(top.numpy(), ref_top)
    assert np.array_equal(order.to(torch.int64).numpy(), ref_order)
    np.testing.assert_allclose(p_ng.numpy()[ref_order > 0], ref_p[ref_order > 0], atol=1e-12)


def test_group_sort_ranks_are_prefix_counts():
    """Each entry's rank within its run of equal keys, put back in stream order, counts the earlier equal keys."""
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 20, 2000)
    perm, starts, rank = train_gpt.group_sort(torch.from_numpy(keys))
    assert int(starts.sum()) == len(set(keys.tolist()))
    got = rank.numpy()
    seen, want = {}, []
    for k in keys.tolist():
        want.append(seen.get(k, 0))
        seen[k] = seen.get(k, 0) + 1
    assert np.array_equal(got, np.array(want))


# ----------------------------------------------------------------------------------------------
# 4. Normalization: the full distributions sum to 1 and agree with the fast path


@pytest.mark.parametrize("vocab,min_count", [(3, 2), (3, 1), (40, 2)])
def test_brute_force_distribution_is_normalized_and_matches(vocab, min_count):
    rng = np.random.default_rng(vocab + min_count)
    toks = rng.integers(0, vocab, 2500)
    if vocab > 3:
        toks[1000:1400] = toks[200:600]
    tokens = torch.from_numpy(toks)
    args = ngram_args(min_count=min_count)
    order, p_ng, count, _ = train_gpt.ngram_tables(tokens, vocab, 2, 7, min_count)
    matched = torch.nonzero(order > 0).flatten().tolist()
    picks = set(rng.choice(np.arange(1, len(toks)), 40, replace=False).tolist())
    picks |= set(rng.choice(matched, 40, replace=False).tolist())
    ref_dists = slow_ngram(toks.tolist(), 2, 7, min_count, keep_dists_at=picks)[2]
    n_matched, g = 0, torch.Generator().manual_seed(vocab)
    for t in sorted(picks):
        dist, o, c = train_gpt.brute_force_ngram(tokens, t, vocab, args)
        assert o == int(order[t]) and c == int(count[t]), t
        if o == 0:
            assert dist is None and t not in ref_dists
            continue
        n_matched += 1
        assert dist.shape == (vocab,) and bool((dist >= 0).all())
        assert abs(float(dist.sum()) - 1.0) < 1e-12
        assert float(dist[toks[t]]) == pytest.approx(float(p_ng[t]), abs=1e-12)
        want = np.zeros(vocab)
        for v, p in ref_dists[t].items():
            want[v] = p
        np.testing.assert_allclose(dist.numpy(), want, atol=1e-12)
        # the mixture with any full softmax is a distribution too
        logits = torch.randn(vocab, dtype=torch.float64, generator=g) * 3
        p_model = torch.softmax(logits, -1)
        ent = -(p_model * p_model.log()).sum()
        alpha = train_gpt.ngram_alpha(ent, args)
        assert float(alpha) == pytest.approx(float(my_alpha(float(ent))), abs=1e-12)
        p_mix = (1 - alpha) * p_model + alpha * dist
        assert abs(float(p_mix.sum()) - 1.0) < 1e-12 and bool((p_mix >= 0).all())
        np.testing.assert_allclose(p_mix.numpy(), (1 - float(alpha)) * p_model.numpy() + float(alpha) * want, atol=1e-12)
    assert n_matched >= 20


# ----------------------------------------------------------------------------------------------
# 5. The audit passes on the real thing and fails on wrong ones


def FIXED(t, phi, offset):
    """The fixed entropy alpha as the audit recomputes it: weights at zero, trust 1 (NGRAM_MIXER=fixed)."""
    return torch.sigmoid(offset)


@pytest.fixture(scope="module")
def audit_case():
    """Records (t, p_fast, order) as a correct fast path would write them, with the model rows the
    audit's own forward would give: random normalized rows over a 5-token vocabulary."""
    vocab = 5
    rng = np.random.default_rng(11)
    toks = rng.integers(0, vocab, 1500)
    tokens = torch.from_numpy(toks)
    args = ngram_args()
    order, p_ng, _, _ = train_gpt.ngram_tables(tokens, vocab, 2, 7, 2)
    positions = train_gpt.audit_positions(order, 40, 0)
    assert len(positions) >= 30 and sum(int(order[t]) > 0 for t in positions) >= 20
    assert all(1 <= t < len(toks) for t in positions)
    records, g = [], torch.Generator().manual_seed(11)
    rows = torch.log_softmax(torch.randn(len(positions), vocab, generator=g, dtype=torch.float64) * 2, -1)
    for t, logp in zip(positions, rows):
        p_model = float(logp[toks[t]].exp())
        a = float(my_alpha(float(-(logp.exp() * logp).sum())))
        p = (1 - a) * p_model + a * float(p_ng[t]) if int(order[t]) > 0 else p_model
        records.append((t, p, int(order[t])))
    return tokens, vocab, args, records, rows


def test_audit_passes_on_correct_records(audit_case):
    tokens, vocab, args, records, rows = audit_case
    rep = train_gpt.audit_ngram(records, rows, tokens, vocab, args, FIXED)
    assert rep["positions"] == len(records)
    assert rep["max_sum_err"] <= 1e-6 and rep["max_target_err"] <= 1e-6 and rep["order_mismatch"] == 0


def test_audit_detects_unnormalized_distributions(audit_case):
    tokens, vocab, args, records, rows = audit_case

    def raw_counts(tok, t, v, a):
        dist, o, c = train_gpt.brute_force_ngram(tok, t, v, a)
        return (None if dist is None else dist * c), o, c

    def inflated(tok, t, v, a):
        dist, o, c = train_gpt.brute_force_ngram(tok, t, v, a)
        return (None if dist is None else dist * 1.01), o, c

    for fn in (raw_counts, inflated):
        rep = train_gpt.audit_ngram(records, rows, tokens, vocab, args, FIXED, dist_fn=fn)
        assert rep["max_sum_err"] > 1e-4, (fn.__name__, rep)
    rep = train_gpt.audit_ngram(records, rows + 0.01, tokens, vocab, args, FIXED)  # a model row summing to e^0.01
    assert rep["max_sum_err"] > 1e-3


def test_audit_detects_wrong_order_and_wrong_fast_value(audit_case):
    tokens, vocab, args, records, rows = audit_case

    def wrong_order(tok, t, v, a):
        dist, o, c = train_gpt.brute_force_ngram(tok, t, v, a)
        return dist, (o + 1 if dist is not None else 0), c

    rep = train_gpt.audit_ngram(records, rows, tokens, vocab, args, FIXED, dist_fn=wrong_order)
    assert rep["order_mismatch"] > 0 and rep["max_sum_err"] <= 1e-6
    bad = [(t, p * 1.01, o) for t, p, o in records]
    rep = train_gpt.audit_ngram(bad, rows, tokens, vocab, args, FIXED)
    assert rep["max_target_err"] > 1e-5
    # a fast path that peeked at x_t (counted position t itself before scoring it) is caught too
    toks = tokens.tolist()
    i = next(j for j, r in enumerate(records) if r[2] > 0 and 0 < p_ng_of(toks, r[0], r[2]) < 1)
    t, _, o = records[i]
    k = o - 1
    same = [s for s in range(k, t + 1) if toks[s - k:s] == toks[t - k:t]]  # includes s = t
    p_peek = sum(toks[s] == toks[t] for s in same) / len(same)
    lp = rows[i]
    a = float(my_alpha(float(-(lp.exp() * lp).sum())))
    peek = list(records)
    peek[i] = (t, (1 - a) * float(lp[toks[t]].exp()) + a * p_peek, o)
    rep = train_gpt.audit_ngram(peek, rows, tokens, vocab, args, FIXED)
    assert rep["max_target_err"] > 1e-6


def p_ng_of(toks, t, o):
    k = o - 1
    same = [s for s in range(k, t) if toks[s - k:s] == toks[t - k:t]]
    return sum(toks[s] == toks[t] for s in same) / len(same)


def test_trained_run_audit_line(trained_run):
    text = trained_run["log"].read_text()
    m = re.findall(r"^ngram_audit positions:(\d+) max_sum_err:(\S+) max_target_err:(\S+) order_mismatch:(\d+)", text, re.M)
    assert len(m) == 1, m
    positions, sum_err, target_err, mismatch = m[0]
    assert int(positions) > 0 and float(sum_err) <= 1e-6 and float(target_err) <= 1e-6 and int(mismatch) == 0


# ----------------------------------------------------------------------------------------------
# 6. Causality: changing the future changes nothing already scored


@pytest.mark.parametrize("cut", [1, 300, 640, 1100])
def test_changing_later_tokens_leaves_earlier_scores_unchanged(eval_setup, luts, cut):
    model, val, _ = eval_setup
    n = len(val)
    changed = val.clone()
    g = torch.Generator().manual_seed(cut)
    changed[cut + 1:] = torch.randint(0, 512, (n - cut - 1,), generator=g)
    changed[cut + 1] = (val[cut + 1] + 1) % 512
    if cut >= 300:  # let the future repeat the past, so n-gram contexts match after the cut as well
        changed[cut + 201:cut + 401] = val[cut - 300:cut - 100][:len(changed[cut + 201:cut + 401])]
    dumps, mixers = [], []
    args = tiny_args(EVAL_BATCH_SEQS=5, NGRAM_MIX_FIRST=32, NGRAM_MIX_CHUNK=128)  # refits before and after the cut
    for stream in (val, changed):
        tables = train_gpt.ngram_tables(stream, 512, 2, 7, 2)  # on the whole stream, as the script does
        res = run_eval(model, stream, luts, args, 2, 64, 16, ngram=tables)
        dumps.append(dump_of(res, stream, tables))
        mixers.append(res["mixer"])
    a, b = dumps
    before = a["pos"] <= cut
    assert before.sum() == cut
    for key in ("nll_model", "nll_mixed", "entropy", "top_p", "alpha", "p_ng"):
        np.testing.assert_allclose(a[key][before], b[key][before], rtol=0, atol=1e-6, err_msg=key)
    for key in ("order", "count", "top"):
        assert np.array_equal(a[key][before], b[key][before])
    for t in range(1, cut + 1, 7):  # the learned weights in force at t: fitted before t, so the same
        assert torch.equal(mixers[0].weights_at(t), mixers[1].weights_at(t))
    assert not torch.equal(mixers[0].weights[-1], mixers[1].weights[-1])
    after = ~before
    assert (np.abs(a["nll_model"][after] - b["nll_model"][after]) > 1e-4).mean() > 0.5
    assert (np.abs(a["nll_mixed"][after] - b["nll_mixed"][after]) > 1e-4).mean() > 0.5


# ----------------------------------------------------------------------------------------------
# 8. The per-token dump of the trained run


DUMP_KEYS = ("pos", "target", "nll_model", "entropy", "top_p", "order", "count", "top", "p_ng", "alpha", "trust",
             "nll_mixed")


def test_dump_is_consistent(trained_run, corpus):
    d = np.load(trained_run["dump"])
    assert set(DUMP_KEYS) <= set(d.files)
    d = {k: d[k] for k in DUMP_KEYS}
    val = val_tokens(corpus)
    n = len(val)
    assert n == corpus["val_tokens"]
    assert np.array_equal(d["pos"], np.arange(1, n))
    assert np.array_equal(d["target"], val[1:])
    no = d["order"] == 0
    yes = ~no
    assert yes.sum() > 0.3 * len(no) and no.sum() > 0
    assert np.isnan(d["p_ng"][no]).all() and np.isnan(d["alpha"][no]).all()
    assert not np.isnan(d["p_ng"][yes]).any() and not np.isnan(d["alpha"][yes]).any()
    assert np.array_equal(d["nll_mixed"][no], d["nll_model"][no])
    assert np.isfinite(d["nll_model"]).all() and np.isfinite(d["nll_mixed"]).all()
    assert ((d["p_ng"][yes] >= 0) & (d["p_ng"][yes] <= 1)).all()
    # the n-gram columns are the slow reference's, on the real validation stream
    ref_order, ref_p, _, ref_count, ref_top = slow_ngram(val.tolist(), 2, 7, 2)
    assert np.array_equal(d["order"], ref_order[1:])
    np.testing.assert_allclose(d["p_ng"][yes], ref_p[1:][yes], rtol=0, atol=1e-12)
    assert np.array_equal(d["count"], ref_count[1:]) and np.array_equal(d["top"], ref_top[1:])
    # the learned mixer (the default) starts at the fixed entropy alpha (times the trust), then leaves it
    first = yes & (d["pos"] < 1 + 256)  # NGRAM_MIX_FIRST in the tiny config
    assert first.sum() > 50 and np.isnan(d["trust"][no]).all() and (d["trust"][yes] > 0).all()
    assert d["trust"][yes][0] == 0.5 and d["trust"][yes][-1] > 0.99  # the mixture pays on this text
    np.testing.assert_allclose(d["alpha"][first] / d["trust"][first], my_alpha(d["entropy"][first]), rtol=1e-12)
    later = yes & (d["pos"] >= 1 + 256)
    assert np.abs(d["alpha"][later] - my_alpha(d["entropy"][later])).max() > 0.05
    assert ((d["alpha"][yes] > 0) & (d["alpha"][yes] < 1)).all()
    assert (d["entropy"] >= -1e-6).all() and (d["entropy"] <= math.log(512) + 1e-5).all()
    assert ((d["top_p"] > 0) & (d["top_p"] <= 1)).all() and (d["top_p"] >= np.exp(-d["nll_model"]) - 1e-12).all()
    a = d["alpha"][yes]
    want = -np.log((1 - a) * np.exp(-d["nll_model"][yes]) + a * d["p_ng"][yes])
    np.testing.assert_allclose(d["nll_mixed"][yes], want, rtol=0, atol=1e-9)
    # the means are the reported losses; with the reported bytes, the bpbs (the tool ran the script's evaluation:
    # the same final lines as the training run's own)
    f = trained_run["finals"]
    assert {k: trained_run["dump_finals"][k] for k in ("sliding", "ngram")} == \
           {k: dict(f[k], eval_ms=trained_run["dump_finals"][k]["eval_ms"]) for k in ("sliding", "ngram")}
    assert f["ngram"]["tokens"] == f["sliding"]["tokens"] == n - 1
    assert d["nll_mixed"].mean() == pytest.approx(f["ngram"]["val_loss"], abs=1e-6)
    assert d["nll_model"].mean() == pytest.approx(f["sliding"]["val_loss"], abs=1e-6)
    nbytes = f["sliding"]["bytes"]
    assert d["nll_mixed"].sum() / math.log(2) / nbytes == pytest.approx(f["ngram"]["val_bpb"], rel=1e-6)
    assert d["nll_model"].sum() / math.log(2) / nbytes == pytest.approx(f["sliding"]["val_bpb"], rel=1e-6)
    assert f["ngram"]["val_bpb"] < f["sliding"]["val_bpb"]  # the mixture helps on this repetitive text
    # the tool's table by order: each order's targets, mean alpha and gain, from the same stream
    table = re.search(r"^ngram_orders order:targets/mean_alpha/bpb_gain (.*)$", trained_run["dump_stdout"], re.M)
    assert table, trained_run["dump_stdout"][-2000:]
    rows = {int(o): v.split("/") for o, v in (kv.split(":") for kv in table.group(1).split())}
    assert set(rows) == set(np.unique(d["order"][yes]).tolist())
    for o, (count, mean_alpha, gain) in rows.items():
        m = d["order"] == o
        assert int(count) == m.sum() and float(mean_alpha) == pytest.approx(d["alpha"][m].mean(), abs=6e-4)
        assert float(gain) == pytest.approx((d["nll_model"][m] - d["nll_mixed"][m]).sum() / math.log(2) / nbytes,
                                            abs=6e-6)


def test_reported_bytes_are_the_validation_text_bytes(trained_run, corpus):
    """The bpb denominator, counted from the text: the UTF-8 bytes of each validation document after
    the tokenizer's NFKC normalization (no dummy prefix, so no byte is invented at a document start)."""
    want = sum(len(unicodedata.normalize("NFKC", doc).encode("utf-8")) for doc in corpus["val_docs"])
    assert trained_run["finals"]["sliding"]["bytes"] == want
    assert trained_run["finals"]["ngram"]["bytes"] == want


def test_dump_matches_artifact_model(trained_run, corpus):
    """Sampled dump rows recomputed from the artifact by a direct forward pass over each window."""
    d = np.load(trained_run["dump"])
    args = tiny_args(ARTIFACT_PATH=str(trained_run["artifact"]), EVAL_ONLY=1)
    model = train_gpt.load_artifact_model(args, FakeRuntime())
    val = torch.from_numpy(val_tokens(corpus))
    n, seq_len, stride = len(val), 64, 16
    rng = np.random.default_rng(5)
    with torch.no_grad():
        for p in sorted({1, 64, 65, 79, 80, 81, n - 1, *rng.integers(1, n, 15).tolist()}):
            end = my_window_end(p, n, seq_len, stride)
            start = max(0, end - seq_len)
            logp = torch.log_softmax(model.logits(model.hidden(val[start:end][None]))[0, p - 1 - start], -1).double()
            assert d["nll_model"][p - 1] == pytest.approx(-float(logp[val[p]]), abs=1e-5), p
            assert d["entropy"][p - 1] == pytest.approx(-float((logp.exp() * logp).sum()), abs=1e-5), p


# ----------------------------------------------------------------------------------------------
# 7, 9, 10. End to end: two processes, a budget too small, NGRAM=0 (EVAL_ONLY on a copy of the artifact)


@pytest.fixture(scope="module")
def eval_only_runs(trained_run, corpus, tmp_path_factory):
    """The three EVAL_ONLY runs, launched together to save wall time."""
    jobs = {}
    specs = {"two_procs": dict(nproc=2), "budget": dict(nproc=1, EVAL_BUDGET_SECONDS=0.001),
             "no_ngram": dict(nproc=1, NGRAM=0)}
    cwd_of = {}
    for name, spec in specs.items():
        cwd = cwd_of[name] = tmp_path_factory.mktemp(name)
        art = cwd / "copy.ptz"
        shutil.copy(trained_run["artifact"], art)
        nproc = spec.pop("nproc")
        env = script_env(corpus, str(cwd), EVAL_ONLY=1, ARTIFACT_PATH=str(art), **spec)
        jobs[name] = (nproc, subprocess.Popen(command(SCRIPT, nproc), cwd=str(cwd), env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
    out = {}
    for name, (nproc, proc) in jobs.items():
        stdout, stderr = proc.communicate(timeout=240)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        out[name].cwd = cwd_of[name]
        if nproc > 1 and proc.returncode == 0:
            out[name].collectives = contract_record(cwd_of[name], nproc)
    return out


def test_two_processes_give_the_same_score(eval_only_runs, trained_run):
    proc = eval_only_runs["two_procs"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "world_size:2" in proc.stdout
    assert proc.collectives["all_reduce"] >= 3 and proc.collectives["all_gather_object"] >= 1  # under the NCCL contract
    got, want = finals(proc.stdout), trained_run["finals"]
    for kind in ("sliding", "ngram"):
        assert got[kind]["val_bpb"] == pytest.approx(want[kind]["val_bpb"], rel=1e-6)
        assert got[kind]["val_loss"] == pytest.approx(want[kind]["val_loss"], rel=1e-6)
        assert got[kind]["tokens"] == want[kind]["tokens"] and got[kind]["bytes"] == want[kind]["bytes"]
        assert got[kind]["coverage"] == 1.0
    m = re.search(r"^ngram_audit positions:(\d+) max_sum_err:(\S+) max_target_err:(\S+) order_mismatch:0", proc.stdout, re.M)
    assert m and int(m.group(1)) > 0 and float(m.group(2)) <= 1e-6


def test_budget_too_small_reports_no_score(eval_only_runs):
    proc = eval_only_runs["budget"]
    assert proc.returncode != 0
    inc = re.findall(r"^final_(sliding|ngram) INCOMPLETE .*coverage:(\S+)", proc.stdout, re.M)
    assert inc and all(float(c) < 1 for _, c in inc)
    assert not re.search(r"^final_(sliding|ngram) val_loss:", proc.stdout, re.M)
    assert "sliding" not in finals(proc.stdout) and "ngram" not in finals(proc.stdout)
    assert "submission path" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("phase", ["ngram_tables", "ngram_mixture", "audit_ngram"])
def test_deadline_covers_the_precompute_and_the_audit(trained_run, corpus, luts, monkeypatch, phase):
    """The eval clock runs through the n-gram precompute, the mixing and the audit too: a run that
    passes its budget in any of them prints INCOMPLETE for the n-gram score, and reports none."""
    val = torch.from_numpy(val_tokens(corpus))
    env = dict(EVAL_ONLY=1, ARTIFACT_PATH=str(trained_run["artifact"]))
    t0 = time.perf_counter()
    train_gpt.evaluate_artifact(tiny_args(**env), FakeRuntime(), quiet, val, luts)
    budget = 2 * (time.perf_counter() - t0) + 0.5  # twice what the whole eval needs
    real = getattr(train_gpt, phase)

    def slow(*a, **k):
        out = real(*a, **k)
        time.sleep(budget)
        return out

    monkeypatch.setattr(train_gpt, phase, slow)
    lines = []
    with pytest.raises(train_gpt.EvalFailure, match="^eval INCOMPLETE: .* of EVAL_BUDGET_SECONDS="):
        train_gpt.evaluate_artifact(tiny_args(EVAL_BUDGET_SECONDS=budget, **env), FakeRuntime(),
                                    lambda msg, **k: lines.append(msg), val, luts)
    text = "\n".join(lines)
    assert re.search(r"^final_ngram INCOMPLETE ", text, re.M) and "final_ngram val_loss" not in text
    assert re.search(r"^final_roundtrip val_loss:", text, re.M)  # finished well inside the budget
    assert re.search(r"^final_sliding val_loss:", text, re.M)  # the pass ends before the n-gram work starts
    assert re.search(r"^eval INCOMPLETE: ", text, re.M)


def test_ngram_off_reports_sliding_only(eval_only_runs, trained_run):
    proc = eval_only_runs["no_ngram"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = finals(proc.stdout)
    assert "sliding" in got and "ngram" not in got
    assert not re.search(r"^ngram_audit ", proc.stdout, re.M)
    assert got["sliding"]["val_bpb"] == pytest.approx(trained_run["finals"]["sliding"]["val_bpb"], rel=1e-6)
    assert got["sliding"]["coverage"] == 1.0


# ----------------------------------------------------------------------------------------------
# 11. The learned mixer: causal, no worse than the model where the n-gram is useless, better than the
# fixed alpha where the n-gram knows something the model does not


def mixer_stream(n: int, seed: int, informative: bool):
    """Made-up matched positions: features as the tables and the pass give them, and the two
    probabilities of the target. Informative: where one continuation dominated its context (top/count
    near 1), the n-gram is right with that probability and the model is unsure; otherwise the n-gram's
    target probability is unrelated to anything and mostly 0."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(2, 8, (n,), generator=g, dtype=torch.int8)
    count = torch.randint(2, 60, (n,), generator=g)
    top = torch.minimum(count, (torch.rand(n, generator=g, dtype=torch.float64) * count).long() + 1)
    entropy = torch.rand(n, generator=g, dtype=torch.float64) * 6
    p_model = torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.01
    top_p = torch.maximum(p_model, torch.rand(n, generator=g, dtype=torch.float64))
    share = top.double() / count
    if informative:
        hit = torch.rand(n, generator=g, dtype=torch.float64) < share
        p_ng = torch.where(hit, share, (1 - share) / 4)
    else:
        p_ng = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.05, share, 0.0)
    pos = torch.arange(1, n + 1) * 2  # every other target matched
    return (order, count, top, entropy, top_p), pos, p_model, p_ng


def mixed_nll(alpha, p_model, p_ng):
    return -torch.log((1 - alpha) * p_model + alpha * p_ng)


def test_learned_weights_at_t_depend_only_on_earlier_positions():
    """Everything at positions >= t changed (features and outcomes): the weights and the trust in force
    at t and every alpha before t stay bitwise the same; at t itself, changing only the outcome
    (p_model(x_t), p_ng(x_t)) leaves alpha_t the same too. Each refit only sees positions before its chunk."""
    args = tiny_args(NGRAM_MIX_FIRST=64, NGRAM_MIX_CHUNK=512)
    feats, pos, p_model, p_ng = mixer_stream(6000, 0, informative=True)
    ref = train_gpt.NgramMixer(args, pos.device)
    alpha = ref.alphas(feats, pos, p_model, p_ng)
    assert len(ref.weights) >= 10 and ref.bounds == sorted(ref.bounds)
    g = torch.Generator().manual_seed(1)
    for i in (0, 1, 63, 64, 700, 2500, 5999):
        t = int(pos[i])
        f2 = tuple(f.clone() for f in feats)
        pm2, png2 = p_model.clone(), p_ng.clone()
        pm2[i:] = torch.rand(len(pos) - i, generator=g, dtype=torch.float64) * 0.9 + 0.05
        png2[i:] = 1 - png2[i:]
        for f in f2[1:3]:
            f[i + 1:] = f[i + 1:] * 3 + 1  # counts and tops after t; t's own features stay
        f2[3][i + 1:] = 6 - f2[3][i + 1:]
        other = train_gpt.NgramMixer(args, pos.device)
        alpha2 = other.alphas(f2, pos, pm2, png2)
        assert torch.equal(ref.weights_at(t), other.weights_at(t)), t
        assert torch.equal(ref.evidence[:i + 1], other.evidence[:i + 1]), t  # the trust at t: evidence[i]
        assert torch.equal(alpha[:i + 1], alpha2[:i + 1]), t
        if i < len(pos) - 1 and t >= ref.bounds[2]:  # later chunks were fitted on changed data
            assert not torch.equal(ref.weights[-1], other.weights[-1])
    # however large the weights, the model keeps a share: a target the n-gram never saw keeps p > 0
    big = train_gpt.NgramMixer.alpha(torch.tensor([40.0, -40.0], dtype=torch.float64),
                                       torch.ones(2, 10, dtype=torch.float64), torch.full((10,), 50.0, dtype=torch.float64))
    assert float(big.max()) == 1 - 1e-6 and bool((big > 0.99).all())
    # the chunks: each refit's data ends where the chunk it serves begins
    for j, b in enumerate(ref.bounds):
        assert ref.weights_at(b) is ref.weights[j] and (j == 0 or ref.weights_at(b - 1) is ref.weights[j - 1])


def test_learned_mixer_starts_at_the_fixed_alpha_and_knob_selects_fixed():
    args = tiny_args(NGRAM_MIX_FIRST=100, NGRAM_MIX_CHUNK=400)
    feats, pos, p_model, p_ng = mixer_stream(1000, 2, informative=True)
    mixer = train_gpt.NgramMixer(args, pos.device)
    alpha = mixer.alphas(feats, pos, p_model, p_ng)
    trust = torch.sigmoid(mixer.evidence)
    assert float(trust[0]) == 0.5 and float(trust[-1]) > 0.99  # prior 1/2; this n-gram pays, so trust grows
    first = pos < 1 + 100  # before the first refit: the fixed alpha, times the trust
    np.testing.assert_allclose((alpha / trust)[first].numpy(), my_alpha(feats[3][first].numpy()), rtol=1e-12)
    assert (alpha[~first] - torch.from_numpy(my_alpha(feats[3][~first].numpy()))).abs().max() > 0.05
    # NGRAM_MIXER=fixed: the entropy alpha everywhere, through the real mixing stage
    n = int(pos[-1]) + 1
    order = torch.zeros(n, dtype=torch.int8)
    tables = train_gpt.NgramTables(order.index_put((pos,), feats[0]), torch.zeros(n, dtype=torch.float64).index_put((pos,), p_ng),
                                   torch.zeros(n, dtype=torch.int64).index_put((pos,), feats[1]),
                                   torch.zeros(n, dtype=torch.int64).index_put((pos,), feats[2]))
    cols = {"nll": torch.zeros(n, dtype=torch.float64).index_put((pos,), -p_model.log()),
            "entropy": torch.zeros(n, dtype=torch.float64).index_put((pos,), feats[3]),
            "top_p": torch.ones(n, dtype=torch.float64).index_put((pos,), feats[4])}
    res = {"stream": cols, "tokens": n - 1, "bytes": 3 * n}
    fixed = train_gpt.ngram_mixture(res, tables, tiny_args(NGRAM_MIXER="fixed"))
    assert not fixed["mixer"].learn and len(fixed["mixer"].weights) == 1
    assert torch.equal(fixed["mixer"].pos, pos) and (fixed["mixer"].evidence.sigmoid() == 1).all()  # trust 1
    np.testing.assert_allclose(fixed["alpha"].numpy(), my_alpha(feats[3].numpy()), rtol=0, atol=1e-12)
    learned = train_gpt.ngram_mixture(res, tables, args)
    assert torch.equal(learned["mixer"].pos, pos)  # alpha only where a context matched
    np.testing.assert_allclose(learned["alpha"].numpy(), alpha.numpy(), rtol=1e-9)  # p_model went through -log
    assert torch.equal(learned["nll_mixed"][1::2], cols["nll"][1::2])  # unmatched: the model, exactly
    np.testing.assert_allclose(learned["nll_mixed"][pos].numpy(), mixed_nll(alpha, p_model, p_ng).numpy(), rtol=1e-12)


def test_learned_mixer_falls_to_zero_where_the_ngram_is_useless():
    """An n-gram whose target probability is mostly 0 and unrelated to every feature: the fixed alpha
    pays for it; the learned weights drive alpha down within the first chunks, so the mixture costs
    next to nothing against the model alone."""
    args = tiny_args()  # the default chunk schedule (1024 doubling)
    feats, pos, p_model, p_ng = mixer_stream(200_000, 3, informative=False)
    alpha = train_gpt.NgramMixer(args, pos.device).alphas(feats, pos, p_model, p_ng)
    base = -p_model.log()
    learned_cost = float((mixed_nll(alpha, p_model, p_ng) - base).mean())
    fixed_cost = float((mixed_nll(torch.from_numpy(my_alpha(feats[3].numpy())), p_model, p_ng) - base).mean())
    assert fixed_cost > 0.1 and 0 <= learned_cost < 0.0005, (fixed_cost, learned_cost)
    for n in (300, 3000, 30_000, 200_000):  # the trust's bound: never more than log 2 nats over any prefix
        assert float((mixed_nll(alpha[:n], p_model[:n], p_ng[:n]) - base[:n]).sum()) <= math.log(2) + 1e-9, n
    late = slice(-50_000, None)
    assert float((mixed_nll(alpha[late], p_model[late], p_ng[late]) - base[late]).mean()) < 0.0002
    assert float(alpha[late].mean()) < 0.002, float(alpha[late].mean())


def test_learned_mixer_beats_the_fixed_alpha_where_the_ngram_pays():
    args = tiny_args()
    feats, pos, p_model, p_ng = mixer_stream(100_000, 4, informative=True)
    mixer = train_gpt.NgramMixer(args, pos.device)
    alpha = mixer.alphas(feats, pos, p_model, p_ng)
    base = -p_model.log()
    learned = float((mixed_nll(alpha, p_model, p_ng) - base).mean())
    fixed = float((mixed_nll(torch.from_numpy(my_alpha(feats[3].numpy())), p_model, p_ng) - base).mean())
    assert learned < fixed - 0.05 and learned < -0.05, (learned, fixed)
    # the refit converges to a stationary point of its regularized loss (given steps enough)
    seen = torch.arange(len(pos))[::-(-len(pos) // args.ngram_mix_chunk)]
    phi, offset = train_gpt.mixer_inputs(*(f[seen] for f in feats), args)
    long_fit = train_gpt.NgramMixer(tiny_args(NGRAM_MIX_STEPS=40), pos.device)
    w = long_fit.fit(long_fit.weights[0], phi, offset, p_model[seen], p_ng[seen]).requires_grad_(True)
    loss = train_gpt.mixture_nll(offset + phi @ w, p_model[seen], p_ng[seen]).mean() + 0.5 * args.ngram_mix_l2 * (w @ w)
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-7
