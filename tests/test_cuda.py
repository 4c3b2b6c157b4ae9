"""The paths that differ on a GPU: placement of host-side records and tables next to device tensors,
torch.compile + bf16 autocast, CUDA-event step timing, fused AdamW, and export from device weights.
Every test here is marked `cuda` and skipped, with the reason, where torch sees no GPU
(`tools/gpu_check.sh` runs them on one). Each compares the GPU against the CPU or against eager mode
rather than only checking that something ran."""
from __future__ import annotations

import glob
import math
import os
import re
import shutil

import pytest
import torch

import train_gpt
from conftest import finals, run_script, tiny_args

pytestmark = pytest.mark.cuda

AUDIT_RE = re.compile(r"^ngram_audit positions:(\d+) max_sum_err:(\S+) max_target_err:(\S+) order_mismatch:(\d+) "
                      r"tol:\S+ sampled:(\d+)$", re.M)


def gpu_runtime(monkeypatch) -> train_gpt.Runtime:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    return train_gpt.Runtime("cuda")


def randomized(args, seed: int) -> train_gpt.GPT:
    """A GPT whose every parameter is random, so no block is the identity and every matmul matters."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def check_audit(stdout: str) -> None:
    m = AUDIT_RE.search(stdout)
    assert m, stdout[-2000:]
    positions, sum_err, target_err, mismatch, sampled = m.groups()
    assert int(positions) == int(sampled) > 0 and int(mismatch) == 0
    assert float(sum_err) <= 1e-6 and float(target_err) <= 1e-6


def test_whole_pipeline_on_the_gpu(corpus, tmp_path):
    """Train (compiled, autocast, CUDA-event timing), export, round trip, sliding + n-gram eval with the
    learned mixer and the audit, all on the GPU: the run completes and its audit holds at the CPU's tolerance."""
    proc = run_script(corpus, tmp_path, timeout=600, DEVICE="cuda")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^env .*device:cuda:0 ", proc.stdout, re.M)
    f = finals(proc.stdout)
    assert set(f) == {"prequant", "roundtrip", "sliding", "ngram"}
    assert all(v["coverage"] == 1.0 and math.isfinite(v["val_bpb"]) for v in f.values())
    check_audit(proc.stdout)
    assert re.search(r"^ngram_mix mixer:learned refits:[1-9]", proc.stdout, re.M)  # refitted on the GPU
    steps = re.findall(r"^step:\d+/\d+ .* fwd_bwd_ms:(\S+) opt_ms:(\S+) other_ms:\S+ ", proc.stdout, re.M)
    assert steps and all(float(a) > 0 and float(b) > 0 for a, b in steps)
    assert re.search(r"^peak_memory_mib:\d+$", proc.stdout, re.M)


def test_gpu_eval_of_a_cpu_artifact_matches_the_cpu(trained_run, corpus, tmp_path):
    """The CPU-trained artifact scored on the GPU (compiled, bf16 body, float64 head): the same targets
    and bytes, bpb within bf16 noise of the CPU's float32 result, and the audit passes."""
    art = tmp_path / "copy.ptz"
    shutil.copy(trained_run["artifact"], art)
    proc = run_script(corpus, tmp_path, timeout=600, DEVICE="cuda", EVAL_ONLY=1, ARTIFACT_PATH=str(art))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, want = finals(proc.stdout), trained_run["finals"]
    for kind in ("roundtrip", "sliding", "ngram"):
        assert (got[kind]["tokens"], got[kind]["bytes"], got[kind]["coverage"]) == \
               (want[kind]["tokens"], want[kind]["bytes"], 1.0), kind
        assert got[kind]["val_bpb"] == pytest.approx(want[kind]["val_bpb"], rel=1e-2), kind
    check_audit(proc.stdout)


def test_ttt_eval_on_the_gpu_matches_the_cpu(trained_run, corpus, tmp_path):
    """TTT=1 on the GPU (adapters under bf16 autocast, uploads, float64 head): the whole eval completes, every
    document adapted, the audit's replay reproduces the fast path within its tolerance, and final_ttt is the
    CPU's within bf16 noise."""
    scores = {}
    for device in ("cpu", "cuda"):
        art = tmp_path / f"{device}.ptz"
        shutil.copy(trained_run["artifact"], art)
        proc = run_script(corpus, tmp_path, timeout=600, DEVICE=device, EVAL_ONLY=1, ARTIFACT_PATH=str(art), TTT=1,
                          TTT_DOCS=16, TTT_RANK=8, RUN_ID=f"ttt_{device}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert re.search(r"^ttt docs:100 adapted:100 ", proc.stdout, re.M)
        check_audit(proc.stdout)
        scores[device] = finals(proc.stdout)
    for kind in ("ttt", "ngram"):
        assert scores["cuda"][kind]["val_bpb"] == pytest.approx(scores["cpu"][kind]["val_bpb"], rel=1e-2), kind


def test_ttt_replay_is_bitwise_on_the_gpu(monkeypatch):
    """The audit's replay must repeat the TTT pass bit for bit: windows of 512 tokens (several key blocks, where the
    fused attention's backward would add dQ atomically), bf16 autocast and the hooks. One batch adapted chunk by
    chunk twice under deterministic() gives equal rows; the pass's audit replay gives its fast path's scores
    exactly; and training's kernel setting is back after each."""
    rt = gpu_runtime(monkeypatch)
    args = tiny_args(TTT=1, TTT_CHUNK=64, TTT_DOCS=4, TTT_RANK=8, TTT_LR=3e-3, EVAL_SEQ_LEN=512)
    model = randomized(args, 0).to(rt.device).eval()
    g = torch.Generator().manual_seed(0)
    val = torch.cat([torch.cat((torch.tensor([train_gpt.BOS_ID]), torch.randint(2, args.vocab_size, (n,), generator=g)))
                     for n in (1500, 1200, 900, 700)]).to(rt.device)
    docs = train_gpt.documents(val)

    def adapt_once():
        with train_gpt.deterministic():
            b, rows = train_gpt.DocBatch(model, val, docs, args, rt, True), []
            for i in range(b.steps):
                rows.append(b.chunk(i)[1])
                b.learn()
        return torch.cat(rows)
    assert torch.equal(adapt_once(), adapt_once()) and not torch.are_deterministic_algorithms_enabled()
    buf, adapted, _ = train_gpt.ttt_scores(model, val, args, rt, train_gpt.Deadline(0))
    picks = [s + k for s, e in docs for k in (1, 100, 577, 640, 1100) if s + k <= e]  # windows past 512 tokens
    rows = train_gpt.ttt_audit_rows(model, val, picks, args, rt, adapted)
    nll = buf[:-1].view(len(train_gpt.SCORE_ROWS), -1)[0]
    assert torch.equal(-rows[torch.arange(len(picks)), val[picks]], nll[picks])


def test_compiled_autocast_matches_eager(monkeypatch):
    """Training forward compiled with fullgraph under bf16 autocast, and the compiled eval body, against
    eager float32 on the same GPU."""
    torch._dynamo.reset()
    rt = gpu_runtime(monkeypatch)
    args = tiny_args(DEVICE="cuda")
    model = randomized(args, 0).to(rt.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(2, args.vocab_size, (4, 64), generator=gen).to(rt.device)
    y = torch.randint(2, args.vocab_size, (4, 64), generator=gen).to(rt.device)
    x[0, 9] = train_gpt.BOS_ID
    with torch.no_grad():
        eager = model(x, y)
        with rt.autocast():
            compiled = torch.compile(model, fullgraph=True)(x, y)
        assert float(compiled) == pytest.approx(float(eager), rel=2e-2)
        hidden = train_gpt.eval_forward(model, args, rt)
        assert hidden is not model.hidden  # compiled on CUDA
        with rt.autocast():
            h = hidden(x).float()
        cos = torch.nn.functional.cosine_similarity(h, model.hidden(x), dim=-1)
        assert float(cos.min()) > 0.99


def test_one_training_step_on_the_gpu(corpus, tmp_path, monkeypatch):
    """A compiled, autocast step with fused AdamW and Muon: finite loss, every parameter moves, the phase
    marks are CUDA events with positive times, and the data stayed on the device."""
    rt = gpu_runtime(monkeypatch)
    args = tiny_args(DEVICE="cuda", GRAD_ACCUM_STEPS=2, LOG_DIR=str(tmp_path / "logs"), RUN_ID="gpu_step")
    model = randomized(args, 1).to(rt.device)  # every gradient non-zero, so every parameter must move
    paths = sorted(glob.glob(os.path.join(corpus["path"], "fineweb_train_*.bin")))
    trainer = train_gpt.Trainer(args, rt, model, train_gpt.BatchLoader(paths, args, rt), train_gpt.Logger(args, rt))
    assert trainer.optimizers[1].defaults["fused"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, marks = trainer.step(0, 1.0)
    torch.cuda.synchronize()
    assert loss.is_cuda and math.isfinite(float(loss))
    assert all(isinstance(m, torch.cuda.Event) for m in marks)
    assert marks[0].elapsed_time(marks[1]) > 0 and marks[1].elapsed_time(marks[2]) > 0
    assert [n for n, p in model.named_parameters() if torch.equal(p, before[n])] == []


def test_training_steps_never_synchronize_the_host(corpus, tmp_path, monkeypatch):
    """The steady state of the training loop (every step logged, the stop rule on) under
    torch.cuda.set_sync_debug_mode("error"): any host synchronization in a step (a blocking copy, .item(),
    a stream or device synchronize) raises. The warm-up, the clock's start and the calibration after the
    loop may synchronize and run outside it."""
    rt = gpu_runtime(monkeypatch)
    args = tiny_args(DEVICE="cuda", ITERATIONS=12, TRAIN_LOG_EVERY=1, MAX_WALLCLOCK_SECONDS=600, WARMUP_STEPS=2,
                     GRAD_ACCUM_STEPS=2, LOG_DIR=str(tmp_path / "logs"), RUN_ID="sync_debug")
    torch.manual_seed(args.seed)
    model = train_gpt.GPT(args).to(rt.device)
    paths = sorted(glob.glob(os.path.join(corpus["path"], "fineweb_train_*.bin")))
    lines = []
    trainer = train_gpt.Trainer(args, rt, model, train_gpt.BatchLoader(paths, args, rt), lambda msg, **k: lines.append(msg))
    trainer.warmup()
    assert trainer.calib_ms > 0 and trainer.host_flags[0].is_pinned()
    real, ran = trainer.run_steps, []

    def checked():
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = real()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ran.append(out[1])
        return out

    monkeypatch.setattr(trainer, "run_steps", checked)
    stats = trainer.train()
    assert ran == [12] and stats["steps"] == 12
    steps = [line for line in lines if line.startswith("step:")]
    assert len(steps) == 12 and all(math.isfinite(float(re.search(r"train_loss:(\S+)", l).group(1))) for l in steps)


def test_export_from_gpu_weights_is_the_cpu_export(monkeypatch, tmp_path):
    """The artifact written from weights on the GPU is byte for byte the one written from the same
    weights on the CPU, and a model loaded from it on the GPU holds the dequantized weights."""
    rt = gpu_runtime(monkeypatch)
    args = tiny_args(DEVICE="cuda", MODEL_DIM=128, ARTIFACT_PATH=str(tmp_path / "gpu.ptz"), ARTIFACT_LIMIT_BYTES=400_000)
    model = randomized(args, 3)
    limit = args.artifact_limit_bytes - os.path.getsize(train_gpt.__file__)
    cpu_blob, info = train_gpt.BudgetFit(model.state_dict(), None).fit(limit, args.model_config(), args.export_gptq)
    assert any(kind == "int" for kind, *_ in info["quantized"].values())
    train_gpt.export_artifact(model.to(rt.device), args, rt, None, lambda *a, **k: None)
    assert (tmp_path / "gpu.ptz").read_bytes() == cpu_blob
    loaded = train_gpt.load_artifact_model(args, rt)
    _, state = train_gpt.deserialize_artifact(args.artifact_path)
    for name, t in loaded.state_dict().items():
        assert t.is_cuda and torch.equal(t.cpu(), state[name]), name
