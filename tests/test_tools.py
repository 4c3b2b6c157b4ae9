"""tools/gpu_check.sh is only ever run on a lent GPU, where a broken script costs the whole lease: its dry
mode runs every step on the CPU at toy size, and must reach a complete, audited run and its summary."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_completes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "PYTHONPATH", "LANG")}
    env.update(GPU_CHECK_DIR=str(tmp_path / "check"), GPU_CHECK_TRAIN_SECONDS="5", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--dry"], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=400)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    stages = re.findall(r"^== \[\d+ s\] (\S+)", out, re.M)
    assert stages == ["environment", "corpus:", "train_gpt.py:", "cuda", "Muon:", "n-gram", "TTT:", "summary"], stages
    assert re.search(r"^device:cpu params:\d+ docs:4 tokens:\d+ rank:64 chunk:32 docs_per_batch:32 .* tok_s:\d+ ", out, re.M)
    assert re.search(r"^projection: 62021846 tokens on 8 ranks at this rate: \d+ s", out, re.M)
    assert re.search(r"^replay: 32 audit positions in \S+ s", out, re.M)
    assert len(re.findall(r"^step:\d muon:(ours|torch) ms:\S+ ops:\d+$", out, re.M)) == 6
    summary = out.split("] summary\n", 1)[1]
    assert re.search(r"^steps:\d+ ms/step:\S+ \(forward\+backward \S+, optimizer \S+, rest \S+\)$", summary, re.M)
    assert re.search(r"^recurrence: on from step \d+ \(\d+ ms\): ms/step \S+ before, \S+ after \(x\S+\), both graphs "
                     r"compiled in the warm-up", summary, re.M)
    for kind in ("prequant", "roundtrip", "sliding", "ngram"):
        assert re.search(rf"^final_{kind} val_loss:\S+ val_bpb:\S+ .*coverage:1.000000 ", summary, re.M), kind
    assert re.search(r"^ngram_audit positions:64 .*order_mismatch:0 tol:1e-06 sampled:64$", summary, re.M)
    assert re.search(r"^calibration tokens:2048 ms:\d+ reserved_ms:\d+ train_total_ms:\d+$", summary, re.M)
    assert re.search(r"^projected 8-GPU eval with TTT=1: \d+ s before the TTT pass .* = \d+ s of the 600", summary, re.M)
    assert re.search(r"^stop rule: calibration took \d+ ms after the last step, \d+ ms reserved \(timed in warm-up\); "
                     r"train_total_ms \d+ of the 5000 ms cap, margin -?\d+ ms$", summary, re.M)  # a loaded CPU's clock
    # may end a few ms past the cap (test_model.py's stop-rule tests bound by how much); here the line must be there
    assert re.search(r"^export bytes_model:\d+ predicted:\d+ limit:\d+ passes:\d+ .* export_ms:\d+$", summary, re.M)
    assert re.search(r"^bits_per_weight attn:\S+ bigram:\S+ embed:\S+ mlp:\S+ other:\S+$", summary, re.M)
    for orders in ("2-7", "2-16"):
        assert re.search(rf"^tokens:1000000 device:cpu orders:{orders} precompute_s:\S+ ", out, re.M), orders
        assert re.search(rf"^tokens:1000000 device:cpu orders:{orders} learned_mixer_s:\S+ refits:\d+ ", out, re.M), orders
    assert re.search(r"^ngram_mix mixer:learned refits:\d+ final_trust:\S+ weights:\S+$", summary, re.M)
    assert re.search(r"^SKIPPED \[\d+\] tests/test_cuda.py: needs a CUDA GPU", out, re.M)
    assert re.search(r"^train_gpt rc:0 cuda_tests rc:0 total_s:\d+$", out, re.M)
    assert os.path.isfile(tmp_path / "check" / "final_model.ptz")


def test_lever_study_reads_the_real_log_and_pairs_by_seed(trained_run):
    """tools/lever_study.py's numbers in docs/runs come from its parse of train_gpt.py's log and its pairing by seed:
    the parse must read this script's final lines and step times (before and after the switch), and the gap change
    between two lengths must carry its sign (negative only when the lever's difference from the defaults shrinks)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import lever_study
    row = lever_study.parse(trained_run["stdout"])
    for kind in ("prequant", "roundtrip", "sliding"):
        assert row[kind] == trained_run["finals"][kind]["val_bpb"], kind
    assert row["steps"] == 10 and row["ms_before"] > 0 and row["ms_after"] > 0  # switch at step 5 of 10

    def rows(long_gap):  # the lever off is better by 0.02 at 120 s, by -long_gap at 480 s
        out = []
        for seed, noise in ((1, 0.001), (2, -0.002), (3, 0.0005)):
            for secs, gap in ((120.0, -0.02), (480.0, long_gap)):
                base = 2.0 - secs / 1000 + noise
                out += [dict(tag="t", lever="defaults", seed=seed, seconds=secs, rc=0, sliding=base),
                        dict(tag="t", lever="qk_gain_1.5", seed=seed, seconds=secs, rc=0, sliding=base + gap),
                        dict(tag="t", lever="no_recurrence", seed=seed, seconds=secs, rc=0,
                             sliding=base - gap + noise * secs / 120)]  # the mirror: the default better
        return out
    lines = {ln.split()[0]: ln for ln in lever_study.gap_changes(rows(-0.005))[1:]}
    assert re.search(r"seeds:\[1, 2, 3\] diff_sliding -0.02000 -> -0.00500 change:-0.01500 \+- 0.00000$",
                     lines["qk_gain_1.5"]), lines
    assert re.search(r"diff_sliding \+0.0\d+ -> \+0.0\d+ change:-0.01\d+ \+- 0.00\d+ \(-\d+\.\d s.e.\)$",
                     lines["no_recurrence"]), lines
    grown = lever_study.gap_changes(rows(-0.03))[1:]  # both gaps grow with steps
    assert len(grown) == 2 and all(float(re.search(r"change:(\S+)", ln).group(1)) > 0 for ln in grown), grown


def test_ttt_rehearsal_runs_both_guards_in_simulated_time(corpus):
    """tools/ttt_rehearsal.py drives this revision's ttt_scores and audit replay, and the previous guard's from git,
    over a stream in the corpus's document shape; at a budget the pass cannot adapt in full, the new guard adapts
    part of the chunk steps and ends in time on every rank."""
    proc = subprocess.run(["python", os.path.join(ROOT, "tools", "ttt_rehearsal.py"), "--data", corpus["path"], "--seeds", "1",
                           "--ranks", "2", "--docs", "400", "--tokens", "400000", "--audit", "16", "--base-us", "40",
                           "--before-s", "60", "--after-s", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = dict(re.findall(r"^seed:1 guard:(\w+) (.*)$", proc.stdout, re.M))
    assert set(rows) == {"new", "old"}, proc.stdout
    new = dict(kv.split(":", 1) for kv in rows["new"].split())
    done, run = (int(x) for x in new["adapted_chunk_steps"].split("/"))
    assert new["in_time"] == "True" and 0 < done < run, rows["new"]
