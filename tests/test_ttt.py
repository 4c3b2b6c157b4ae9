"""Score-first test-time training (TTT=1): every target scored once, each chunk by adapters trained only on
earlier chunks of its own document (by construction and by the audit, which must catch an adapter that saw
its chunk), the same result on any world size, TTT_LR=0 exactly the document-wise eval of the base model,
and never past the eval budget."""
from __future__ import annotations

import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import train_gpt
from conftest import SCRIPT, command, contract_record, finals, script_env, tiny_args
from test_eval import FakeRuntime, luts, one_thread, random_model, run_eval  # noqa: F401 (fixtures: luts, one_thread)

BOS = train_gpt.BOS_ID
TTT = dict(TTT=1, TTT_CHUNK=8, TTT_DOCS=4, TTT_RANK=4, EVAL_SEQ_LEN=32, EVAL_STRIDE=8)


def doc_stream(lengths, seed: int, repeat: bool = False) -> torch.Tensor:
    """Documents [BOS] + tokens; with `repeat`, each document repeats a random phrase of its own, something
    an adapter can learn within the document and the base model cannot know."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        body = torch.randint(2, 512, (n,), generator=g)
        if repeat:
            body = torch.randint(2, 512, (6,), generator=g).repeat(n // 6 + 1)[:n]
        parts += [torch.tensor([BOS]), body]
    return torch.cat(parts)


LENGTHS = [70, 3, 40, 9, 1, 33, 100, 17, 8, 25, 64, 2]  # longer than the window, shorter than a chunk, ...


def scores(model, val, args, world=1, adapt_budget=0.0):
    """The TTT pass as `world` simulated ranks, buffers summed as the all-reduce sums them."""
    parts = [train_gpt.ttt_scores(model, val, args, FakeRuntime(r, world), train_gpt.Deadline(adapt_budget))[:2]
             for r in range(world)]
    buf = torch.stack([p[0] for p in parts]).sum(0)
    return buf[:-1].view(len(train_gpt.SCORE_ROWS), len(val)), torch.stack([p[1] for p in parts]).sum(0)


def test_documents_partition_the_targets():
    for stream in ([BOS, 5, 6, BOS, 7, BOS, BOS, 8, 9], [4, 5, BOS, 6], [BOS, 3, BOS], [BOS, 2], [7, 8, 9, 10]):
        val = torch.tensor(stream)
        docs = train_gpt.documents(val)
        targets = [t for s, e in docs for t in range(s + 1, e + 1)]
        assert targets == list(range(1, len(val))), (stream, docs)
        for s, e in docs:
            assert s == 0 or val[s] == BOS  # a document's inputs start at its BOS
            assert all(val[t] != BOS for t in range(s + 1, e))  # only its last target may be the next BOS


def test_every_target_is_scored_once_and_bytes_are_those_of_the_sliding_pass(luts):
    model, val = random_model(0), doc_stream(LENGTHS, 1)
    args = tiny_args(**TTT)
    rows, adapted = scores(model, val, args)
    assert torch.equal(rows[3][1:], torch.ones(len(val) - 1)) and rows[3][0] == 0
    docs = train_gpt.documents(val)
    assert [int(adapted[d]) for d in range(len(docs))] == [  # each batch adapts every chunk step it runs
        -(-max(docs[x][1] - docs[x][0] for x in b) // 8) for d in range(len(docs))
        for b in train_gpt.ttt_batches(docs, 4) if d in b]
    res = train_gpt.stream_scores(torch.cat((rows.flatten(), torch.zeros(1))), val, luts, 0.0)
    sliding = train_gpt.stream_scores(train_gpt.score_windows(model, val, args, FakeRuntime(), seq_len=32, stride=8,
                                                              deadline=train_gpt.Deadline(0)), val, luts, 0.0)
    assert res["complete"] and (res["tokens"], res["bytes"]) == (sliding["tokens"], sliding["bytes"])


def base_model_reference(model, val, args) -> torch.Tensor:
    """The document-wise chunked eval of the base model, one window at a time: target t of a document that
    starts at s, in the chunk that ends at b, scored by a forward of tokens [max(s, b - EVAL_SEQ_LEN), b)."""
    nll = torch.zeros(len(val), dtype=torch.float64)
    C, L = args.ttt_chunk, args.eval_seq_len
    with torch.no_grad():
        for s, e in train_gpt.documents(val):
            for a in range(s, e, C):
                b = min(a + C, e)
                w = max(s, b - L)
                logp = torch.log_softmax(model.logits(model.hidden(val[w:b][None])[0], torch.float64), -1)
                for t in range(a + 1, b + 1):
                    nll[t] = -logp[t - 1 - w, val[t]]
    return nll


def test_lr_zero_is_the_document_wise_eval_of_the_base_model():
    """TTT_LR=0: the adapters never move, so the pass is the base model scoring each document's chunks from its
    own prefix: bitwise the pass whose budget lets no chunk adapt (not even the first batch's), and a
    window-by-window reference (float32 body, batched differently: within 1e-5)."""
    model, val = random_model(1), doc_stream(LENGTHS, 2)
    zero, adapted = scores(model, val, tiny_args(**TTT, TTT_LR=0))
    assert int(adapted.min()) > 0
    unadapted, adapted = scores(model, val, tiny_args(**TTT, TTT_RESERVE_SECONDS=1e6), adapt_budget=1000.0)
    assert int(adapted.sum()) == 0 and torch.equal(zero, unadapted)
    ref = base_model_reference(model, val, tiny_args(**TTT))
    np.testing.assert_allclose(zero[0].numpy(), ref.numpy(), rtol=0, atol=1e-5)


def test_adapters_learn_within_a_document_and_start_as_the_base_model():
    """On documents that repeat a phrase of their own, adaptation lowers the loss of later chunks; the first chunk
    of every document is scored before any step (B = 0): exactly the base model's score."""
    model, val = random_model(2), doc_stream([96] * 8, 3, repeat=True)
    base, _ = scores(model, val, tiny_args(**TTT, TTT_LR=0))
    ttt, _ = scores(model, val, tiny_args(**TTT, TTT_LR=3e-3))
    docs = train_gpt.documents(val)
    first = [t for s, e in docs for t in range(s + 1, min(s + 9, e + 1))]
    later = [t for s, e in docs for t in range(s + 9, e + 1)]
    assert torch.equal(ttt[0][first], base[0][first])
    assert float(ttt[0][later].mean()) < float(base[0][later].mean()) - 0.5, (ttt[0][later].mean(), base[0][later].mean())


def test_same_result_on_any_world_size_and_batch_neighbours():
    """Batches are the same on any world size (longest documents first, TTT_DOCS a batch), each owned by one rank:
    1, 2 and 3 simulated ranks give bitwise the same stream. Other neighbours (TTT_DOCS=3) change a document's
    numbers only by float rounding."""
    model, val = random_model(3), doc_stream(LENGTHS, 4)
    args = tiny_args(**TTT, TTT_LR=3e-3)
    one, _ = scores(model, val, args)
    for world in (2, 3):
        assert torch.equal(scores(model, val, args, world)[0], one), world
    other, _ = scores(model, val, tiny_args(**dict(TTT, TTT_DOCS=3), TTT_LR=3e-3))
    np.testing.assert_allclose(other[0].numpy(), one[0].numpy(), rtol=0, atol=1e-4)


def streams(a, b):
    res = [{"stream": {"nll": nll}, "tokens": len(nll) - 1, "bytes": 3 * len(nll), "bpb_model": 1.0, "complete": True}
           for nll in (a, b)]
    return train_gpt.switched(*res)


def test_the_switch_is_causal_and_never_costs_over_a_bit():
    """The switched stream is p = w_t p_ttt + (1 - w_t) p_sliding with w_t from the targets before t only; over
    every prefix its loss is at most the better pass's + log 2; the weight goes to the pass that predicts better."""
    g = torch.Generator().manual_seed(0)
    a = 3 * torch.rand(500, generator=g, dtype=torch.float64)
    b = (a - 0.3 + 0.5 * torch.randn(500, generator=g, dtype=torch.float64)).clamp(min=0.01)
    a[0] = b[0] = 0  # position 0 is no target: both passes leave it at zero
    for sliding, ttt, ttt_wins in ((a, b, True), (b, a, False)):
        out = streams(sliding, ttt)
        w, nll = torch.sigmoid(out["switch_evidence"]), out["stream"]["nll"]
        assert nll[0] == 0 and w[0] == 0.5 and bool(w[-1] > 0.99) == ttt_wins and bool(w[-1] < 0.01) != ttt_wins
        torch.testing.assert_close(torch.exp(-nll), w * torch.exp(-ttt) + (1 - w) * torch.exp(-sliding), rtol=1e-12,
                                   atol=0)
        best = torch.minimum(torch.cumsum(sliding, 0), torch.cumsum(ttt, 0))
        assert bool((torch.cumsum(nll, 0) <= best + math.log(2) + 1e-9).all())
        assert out["loss_model"] == pytest.approx(float(nll.sum()) / 499, rel=1e-12)
        for t in (1, 2, 100, 499):  # every outcome from t on changed: the weight at t is the same, bit for bit
            s2, t2 = sliding.clone(), ttt.clone()
            s2[t:], t2[t:] = t2[t:] + 1, s2[t:] * 2
            assert torch.equal(streams(s2, t2)["switch_evidence"][:t + 1], out["switch_evidence"][:t + 1])


def audit_errors(model, val, args, nll, adapted, picks):
    rows = train_gpt.ttt_audit_rows(model, val, picks, args, FakeRuntime(), adapted)
    return [abs(float(row[val[t]].exp()) - math.exp(-float(nll[t]))) for t, row in zip(picks, rows)]


def test_audit_replays_the_adaptation_and_catches_an_adapter_that_saw_its_chunk():
    """The audit's replay of t's batch up to t's chunk, with t's document changed from t on, gives the fast path's
    p(x_t) to float64 precision; a fast path whose adapters took their step on a chunk before scoring it (peeking
    at x_t) is off by far more than the tolerance, at the default TTT_LR."""
    model, val = random_model(4), doc_stream([96] * 4 + [40] * 4, 5, repeat=True)
    args = tiny_args(**TTT)
    assert args.ttt_lr == 1e-4  # the default
    rows, adapted = scores(model, val, args)
    docs = train_gpt.documents(val)
    picks = [s + k for s, e in docs for k in (1, 8, 9, 17, 40, 95) if s + k <= e]
    assert max(audit_errors(model, val, args, rows[0], adapted, picks)) <= train_gpt.AUDIT_TOL / 100
    peek = torch.zeros(len(val), dtype=torch.float64)
    for batch in train_gpt.ttt_batches(docs, args.ttt_docs):
        b = train_gpt.DocBatch(model, val, [docs[d] for d in batch], args, FakeRuntime(), True)
        for i in range(b.steps):
            b.chunk(i)
            b.learn()  # the step on chunk i before chunk i is scored
            pos, _, nll = b.chunk(i)
            peek[pos] = nll
    errs = audit_errors(model, val, args, peek, adapted, picks)
    assert max(errs) > 100 * train_gpt.AUDIT_TOL, max(errs)


class SimulatedTime:
    """The clock of a TTT pass whose every chunk step costs `unit` seconds to score and twice that more to adapt
    (backward and step): the guard's measured times are then exact, so what it promises can be checked to the
    last step. Nothing else moves the clock."""

    def __init__(self, monkeypatch, unit: float):
        self.now = 0.0
        monkeypatch.setattr(train_gpt.time, "perf_counter", lambda: self.now)
        chunk, learn = train_gpt.DocBatch.chunk, train_gpt.DocBatch.learn

        def timed_chunk(b, i, adapt=True):
            self.now += unit
            return chunk(b, i, adapt)

        def timed_learn(b):
            self.now += 2 * unit
            learn(b)
        monkeypatch.setattr(train_gpt.DocBatch, "chunk", timed_chunk)
        monkeypatch.setattr(train_gpt.DocBatch, "learn", timed_learn)


def test_the_guard_adapts_chunk_by_chunk_and_reserves_the_audit(monkeypatch):
    """A budget for about half the adaptation, in simulated time: the guard stops adapting in the middle of a batch
    (its later chunks and the later batches score as the base model, so every target is scored once), the pass and
    the audit's replay of every sampled position end inside the budget less TTT_RESERVE_SECONDS, and the replay
    reproduces the fast path on both sides of the stop. A budget that cannot hold the whole replay shrinks the
    audit to a prefix of its sample (a pair at least); one that holds the base model alone adapts no chunk, the
    first batch's neither."""
    model, val = random_model(6), doc_stream([200, 150, 120, 96, 90, 80, 64, 60, 40, 33, 20, 9], 7, repeat=True)
    args = tiny_args(**TTT, TTT_RESERVE_SECONDS=5.0)  # chunks of 8, 4 documents a batch
    docs, unit = train_gpt.documents(val), 1e-3
    batches = train_gpt.ttt_batches(docs, 4)
    steps = {d: -(-max(docs[x][1] - docs[x][0] for x in b) // 8) for b in batches for d in b}
    doc_of = {t: d for d, (s, e) in enumerate(docs) for t in range(s + 1, e + 1)}
    audit = list(range(3, len(val), 7))
    replay = [unit * ((t - docs[doc_of[t]][0] - 1) // 8 + 1) for t in audit]  # each alone, nothing adapted
    base = unit * sum(steps[b[0]] for b in batches)
    for slack, audit_share in ((1.0, 1.0), (0.2, 0.25), (0.0, 0.0)):  # adapting costs 3x scoring
        clock = SimulatedTime(monkeypatch, unit)
        budget = 4 * unit + base * (1 + slack) + sum(replay) * audit_share + args.ttt_reserve_seconds  # 4: probes
        buf, adapted, keep = train_gpt.ttt_scores(model, val, args, FakeRuntime(), train_gpt.Deadline(budget), audit)
        rows = buf[:-1].view(len(train_gpt.SCORE_ROWS), len(val))
        assert torch.equal(rows[3][1:], torch.ones(len(val) - 1)) and not buf[-1]  # whole, in time
        if not slack:
            assert int(adapted.sum()) == 0 and keep == 2  # the audit keeps a pair: one of each half
            continue
        room = base * slack + sum(replay) * audit_share  # past scoring and replaying everything unadapted
        assert sum(replay[:keep]) <= room + 1e-9 and (keep == len(audit) or sum(replay[:keep + 1]) > room)
        assert keep == len(audit) if audit_share == 1 else 2 < keep < len(audit)
        replayed = train_gpt.ttt_audit_rows(model, val, audit[:keep], args, FakeRuntime(), adapted)
        assert clock.now <= budget - args.ttt_reserve_seconds + 1e-9, (clock.now, budget)
        errs = [abs(float(r[val[t]].exp()) - math.exp(-float(rows[0][t]))) for t, r in zip(audit, replayed)]
        assert max(errs) <= train_gpt.AUDIT_TOL / 100
        if audit_share == 1:
            assert 0 < int(adapted.sum()) < sum(steps.values())
            cut = [d for d in steps if 0 < int(adapted[d]) < steps[d]]  # a batch that stopped inside
            sides = {(t - docs[doc_of[t]][0] - 1) // 8 < int(adapted[doc_of[t]]) for t in audit if doc_of[t] in cut}
            assert cut and sides == {True, False}, (cut, sides)


def test_the_pass_and_its_replay_run_deterministic_kernels_and_give_them_back(monkeypatch):
    """Inside the TTT pass and the audit's replay torch runs only deterministic kernels (what makes the replay
    bitwise on CUDA, README); training's setting is restored after each."""
    seen = []
    chunk = train_gpt.DocBatch.chunk
    monkeypatch.setattr(train_gpt.DocBatch, "chunk", lambda b, i, adapt=True: (
        seen.append(torch.are_deterministic_algorithms_enabled()), chunk(b, i, adapt))[1])
    model, val = random_model(7), doc_stream([40, 30, 20], 8)
    args = tiny_args(**TTT)
    assert not torch.are_deterministic_algorithms_enabled()
    _, adapted, _ = train_gpt.ttt_scores(model, val, args, FakeRuntime(), train_gpt.Deadline(0))
    train_gpt.ttt_audit_rows(model, val, [5, 40, 60], args, FakeRuntime(), adapted)
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()


def test_each_pass_reads_the_clock_after_the_device_is_done(monkeypatch):
    """The deadline's last reading in the sliding pass and in the TTT pass comes after a synchronization, so that a
    pass whose queued work ends past the deadline is not counted as in time."""
    events = []

    class Recording(FakeRuntime):
        def sync(self):
            events.append("sync")

    class Watched(train_gpt.Deadline):
        def passed(self):
            events.append("read")
            return super().passed()

    model, val = random_model(8), doc_stream([40, 30, 20], 9)
    args = tiny_args(**TTT)
    train_gpt.score_windows(model, val, args, Recording(), seq_len=32, stride=8, deadline=Watched(100.0))
    assert events[-2:] == ["sync", "read"]
    events.clear()
    train_gpt.ttt_scores(model, val, args, Recording(), Watched(100.0))
    assert events[-2:] == ["sync", "read"]


def test_audit_positions_alternate_so_any_prefix_holds_both_halves():
    """The sample is drawn in turn from all targets and from the matched ones, so the prefix the TTT pass keeps
    when the budget is short still covers both (the matched half is where the n-gram's probability enters)."""
    val = torch.cat((doc_stream([3000] * 3, 10, repeat=True), doc_stream([3000] * 3, 11)))  # matched, then not
    tables = train_gpt.ngram_tables(val, 512, 2, 7, 2)
    picks = train_gpt.audit_positions(tables.order, 64, seed=3)
    assert len(picks) == 64 and len(set(picks)) == 64
    assert all(int(tables.order[t]) > 0 for t in picks[1::2])  # every second one matched
    assert sum(int(tables.order[t]) == 0 for t in picks[0::2]) > 0  # and the others drawn from all targets


def test_the_audit_rebuilds_the_switch(luts):
    """With TTT=1 the audit mixes its replayed TTT row and its own sliding row by the switch's weight at t, so it
    passes on the fast path and fails when the weight used to score is not the one the evidence gives."""
    model, val = random_model(5), doc_stream([96] * 4 + [40] * 4, 5, repeat=True)
    args = tiny_args(**TTT, TTT_LR=0.03)  # adapters that move p(x_t) far from the sliding pass's
    sliding = run_eval(model, val, luts, args, 1, args.eval_seq_len, args.eval_stride)
    buf, adapted, _ = train_gpt.ttt_scores(model, val, args, FakeRuntime(), train_gpt.Deadline(0))
    ttt = train_gpt.stream_scores(buf, val, luts, 0.0)
    base = dict(train_gpt.switched(sliding, ttt), adapted=adapted)
    tables = train_gpt.ngram_tables(val, 512, 2, 7, 2)
    # every 7th target, and the 5 where the switch matters most: the weight on the sliding pass x the passes' gap
    w = torch.sigmoid(base["switch_evidence"])
    gap = (1 - w) * (torch.exp(-sliding["stream"]["nll"]) - torch.exp(-ttt["stream"]["nll"])).abs()
    picks = sorted(set(range(1, len(val), 7)) | set(torch.topk(gap, 5).indices.tolist()))
    assert float(gap.max()) > 1e-3 and float(w[-1]) > 0.99  # the adapters won, but not from the start

    def audit(res):
        mixed = train_gpt.ngram_mixture(res, tables, args)
        return train_gpt.run_audit(model, val, mixed, tables, picks, args, FakeRuntime(), train_gpt.Deadline(0))

    assert audit(base)["max_target_err"] <= train_gpt.AUDIT_TOL / 100
    flipped = dict(base, switch_evidence=-base["switch_evidence"])  # weights other than those it scored with
    assert audit(flipped)["max_target_err"] > 100 * train_gpt.AUDIT_TOL
    unswitched = dict(base, stream=ttt["stream"])  # the adapted pass's own scores, reported as the switch's
    assert audit(unswitched)["max_target_err"] > 100 * train_gpt.AUDIT_TOL


@pytest.fixture(scope="module")
def ttt_runs(trained_run, corpus, tmp_path_factory):
    """EVAL_ONLY runs of the trained tiny artifact with TTT=1, launched together: one process, two under the NCCL
    contract, and one whose reserve leaves no room to adapt past the first batch."""
    jobs = {}
    for name, nproc, extra in (("one", 1, {}), ("two", 2, {}), ("budget", 1, dict(TTT_RESERVE_SECONDS=599.999))):
        cwd = tmp_path_factory.mktemp(f"ttt_{name}")
        art = cwd / "copy.ptz"
        shutil.copy(trained_run["artifact"], art)
        env = script_env(corpus, str(cwd), EVAL_ONLY=1, ARTIFACT_PATH=str(art), EVAL_BUDGET_SECONDS=600, TTT=1,
                         TTT_DOCS=16, TTT_RANK=8, **extra)
        jobs[name] = (cwd, nproc, subprocess.Popen(command(SCRIPT, nproc), cwd=str(cwd), env=env, text=True,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = {}
    for name, (cwd, nproc, proc) in jobs.items():
        stdout, stderr = proc.communicate(timeout=400)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert proc.returncode == 0, (name, stdout[-3000:], [l for l in stderr.splitlines() if "rror" in l or
                                                              "terminate" in l or "abort" in l.lower()][:20])
        if nproc > 1:
            out[name].collectives = contract_record(cwd, nproc)
    return out


TTT_LINE = re.compile(r"^ttt docs:(\d+) adapted:(\d+) val_bpb_adapted:(\d\.\d{8}) switch_weight:(\d\.\d{4})$", re.M)


def test_whole_eval_with_ttt_reports_and_audits(ttt_runs, trained_run):
    proc = ttt_runs["one"]
    got, want = finals(proc.stdout), trained_run["finals"]
    assert list(got) == ["roundtrip", "sliding", "ttt", "ngram"]
    for kind in ("ttt", "ngram"):
        assert (got[kind]["tokens"], got[kind]["bytes"], got[kind]["coverage"]) == \
               (want["sliding"]["tokens"], want["sliding"]["bytes"], 1.0)
    assert got["sliding"]["val_bpb"] == want["sliding"]["val_bpb"]
    (docs, adapted, adapted_bpb, weight), = TTT_LINE.findall(proc.stdout)
    assert int(docs) == int(adapted) == 100  # the corpus's validation documents, all adapted
    # final_ttt is the switch: within a bit over the validation bytes of the better of the two passes
    bound = 1 / got["ttt"]["bytes"]
    assert got["ttt"]["val_bpb"] <= min(float(adapted_bpb), got["sliding"]["val_bpb"]) + bound + 1e-8
    audit = re.search(r"^ngram_audit positions:(\d+) max_sum_err:\S+ max_target_err:(\S+) order_mismatch:0 tol:\S+ "
                      r"sampled:(\d+)$", proc.stdout, re.M)
    assert audit and audit.group(1) == audit.group(3) and float(audit.group(2)) <= 1e-6
    assert re.search(r"^eval_time .*sliding_ms:\d+ ngram_precompute_ms:\d+ ttt_ms:\d+ mix_ms", proc.stdout, re.M)


def test_two_processes_give_the_same_ttt_score(ttt_runs):
    one, two = finals(ttt_runs["one"].stdout), finals(ttt_runs["two"].stdout)
    for kind in ("ttt", "ngram"):
        assert two[kind]["val_bpb"] == pytest.approx(one[kind]["val_bpb"], rel=1e-9), kind
    assert ttt_runs["two"].collectives["all_reduce"] >= 5


def test_a_tight_budget_scores_everything_and_adapts_what_fits(ttt_runs):
    """Reserve all but a millisecond of the budget for the rest of the eval: no chunk step has room to adapt, not
    even the first batch's (the guard prices every one), so every document is scored as the base model, whole."""
    proc = ttt_runs["budget"]
    (docs, adapted, adapted_bpb, weight), = TTT_LINE.findall(proc.stdout)
    assert int(adapted) == 0 < int(docs)
    f = finals(proc.stdout)
    assert f["ttt"]["coverage"] == 1.0 and f["ngram"]["coverage"] == 1.0
    assert adapted_bpb != TTT_LINE.findall(ttt_runs["one"].stdout)[0][2]  # the adapted pass itself changed
