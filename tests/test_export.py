"""Export: the budget fit (finest steps by clip search, Fisher-weighted steps, GPTQ, every limit met),
calibration statistics, deterministic per-tensor zstd frames, the byte accounting, the cannot-fit
failure, and evaluating an existing artifact (EVAL_ONLY). Every configuration here quantizes its
matrices (TINY is 96 wide, the round-trip model 128).

Subprocess runs are few and overlapped: the fresh-process round trip, the over-the-cap run and an
EVAL_ONLY run on a truncated artifact start in the background when this module starts; the two EVAL_ONLY
runs on the trained artifact start together once the shared `trained_run` exists. Start-up errors that
need no training are checked by calling train_gpt.main() in this process."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zstandard

from conftest import ROOT, SCRIPT, TINY, finals, script_env, tiny_args

import train_gpt as T

SHAPE_VARS = ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "ROPE_DIMS",
              "XSA_LAST_N", "BIGRAM_VOCAB_SIZE", "BIGRAM_DIM", "RECUR_LAYERS")
ARTIFACT_RE = re.compile(r"^artifact bytes_code:(\d+) bytes_model:(\d+) bytes_total:(\d+) path:(\S+)(.*)$", re.M)
COMPARED = ("val_loss", "val_bpb", "tokens", "bytes", "coverage")


# ----------------------------------------------------------------------------------------------
# Background subprocesses (stdout/stderr go to files, so no pipe can fill up while we wait)


class Background:
    def __init__(self, cwd, env, argv=None):
        os.makedirs(cwd, exist_ok=True)
        self.cwd = str(cwd)
        self._out = open(os.path.join(self.cwd, "proc_stdout.txt"), "w+")
        self._err = open(os.path.join(self.cwd, "proc_stderr.txt"), "w+")
        self.proc = subprocess.Popen(argv or [sys.executable, SCRIPT], cwd=self.cwd, env=env,
                                     stdout=self._out, stderr=self._err, text=True)
        self._result = None

    def result(self, timeout: int = 300) -> subprocess.CompletedProcess:
        if self._result is None:
            rc = self.proc.wait(timeout=timeout)
            outs = []
            for f in (self._out, self._err):
                f.flush()
                f.seek(0)
                outs.append(f.read())
                f.close()
            self._result = subprocess.CompletedProcess(self.proc.args, rc, outs[0], outs[1])
        return self._result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.result()


def dequantize_state(quantized: dict) -> dict:
    """The weights a quantized plan stands for (codes x row steps, or the fp16 values): what the artifact loads."""
    return {name: T.dequantize(q, s) for name, (kind, _, q, s) in quantized.items()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def env_without_shape(corpus, cwd, keep=(), **overrides) -> dict:
    env = script_env(corpus, str(cwd), **overrides)
    for key in SHAPE_VARS:
        if key not in keep:
            env.pop(key, None)
    return env


RT_OVERRIDES = {"MODEL_DIM": "128"}  # big enough that MLP and attention matrices become int5/int6
RT_FRACTION = 0.85  # the round-trip artifact is fit to this share of its finest plan's size: the budget binds

CHILD = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    import train_gpt as T
    tokens_path, out_path, state_path, blob_path, limit = sys.argv[2:7]
    args = T.Hyperparameters()
    config, state = T.deserialize_artifact(args.artifact_path)
    model = T.load_artifact_model(args, T.Runtime("cpu"))
    with torch.no_grad():
        logits = model.logits(model.hidden(torch.load(tokens_path)))
    torch.save({"logits": logits, "config": config, "state": state}, out_path)
    src = torch.load(state_path)
    with open(blob_path, "wb") as f:
        f.write(T.BudgetFit(src, None).fit(int(limit), args.model_config(), False)[0])
""")


@pytest.fixture(scope="module")
def rt_artifact(tmp_path_factory):
    """A tiny model (MODEL_DIM=128) with random non-zero weights, fit in-process (no statistics, no GPTQ)
    to RT_FRACTION of the size of its finest plan."""
    d = tmp_path_factory.mktemp("roundtrip")
    args = tiny_args(**RT_OVERRIDES)
    gen = torch.Generator().manual_seed(7)
    model = T.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fit = T.BudgetFit(state, None)
    finest = len(T.serialize_artifact(fit.quantize(math.exp(fit.bounds[0]), False), args.model_config()))
    limit = int(RT_FRACTION * finest)
    blob, info = fit.fit(limit, args.model_config(), False)
    quantized = info["quantized"]
    (d / "model.ptz").write_bytes(blob)
    torch.save(state, d / "state.pt")
    idx = torch.randint(0, args.vocab_size, (3, 64), generator=gen)
    torch.save(idx, d / "tokens.pt")
    (d / "child.py").write_text(CHILD)
    return {"dir": d, "args": args, "model": model, "state": state, "quantized": quantized, "blob": blob, "idx": idx,
            "limit": limit, "finest": finest, "info": info}


@pytest.fixture(scope="module", autouse=True)
def background(corpus, rt_artifact, tmp_path_factory):
    """Subprocesses that need neither each other nor the trained run, started when the module starts:
    the fresh-process round trip, the over-the-cap run, and EVAL_ONLY with a truncated artifact."""
    procs = {}
    d = rt_artifact["dir"]
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    env.update(TINY, **RT_OVERRIDES, ARTIFACT_PATH=str(d / "model.ptz"), DEVICE="cpu", OMP_NUM_THREADS="1")
    procs["child"] = Background(d / "child", env, [sys.executable, str(d / "child.py"), ROOT, str(d / "tokens.pt"),
                                                   str(d / "out.pt"), str(d / "state.pt"), str(d / "blob2.ptz"),
                                                   str(rt_artifact["limit"])])
    cwd = tmp_path_factory.mktemp("over_limit")
    (cwd / "final_model.ptz").write_bytes(b"a stale artifact from an earlier run")
    procs["over_limit"] = Background(cwd, script_env(corpus, str(cwd), ARTIFACT_LIMIT_BYTES=1000, ITERATIONS=1,
                                                     WARMUP_STEPS=0, NGRAM=0))
    cwd = tmp_path_factory.mktemp("truncated")
    blob, path = rt_artifact["blob"], cwd / "model.ptz"
    path.write_bytes(blob[: len(blob) // 2])
    procs["truncated"] = Background(cwd, script_env(corpus, str(cwd), EVAL_ONLY=1, ARTIFACT_PATH=str(path),
                                                    DEVICE="cpu", **RT_OVERRIDES))
    procs["truncated"].path = path
    yield procs
    for bg in procs.values():
        bg.stop()


@pytest.fixture(scope="module")
def eval_only_runs(trained_run, corpus, tmp_path_factory):
    """EVAL_ONLY against copies of the trained artifact, with the shape variables removed from the
    environment: all of them, and all but VOCAB_SIZE. Launched together."""
    original = trained_run["artifact"].read_bytes()
    runs = {}
    for name, keep in (("no_shape_vars", ()), ("vocab_only", ("VOCAB_SIZE",))):
        cwd = tmp_path_factory.mktemp(name)
        path = cwd / "model.ptz"
        path.write_bytes(original)
        env = env_without_shape(corpus, cwd, keep=keep, EVAL_ONLY=1, ARTIFACT_PATH=str(path), DEVICE="cpu")
        runs[name] = {"bg": Background(cwd, env), "path": path}
    try:
        for r in runs.values():
            r["proc"] = r["bg"].result()
        yield {"runs": runs, "original": original}
    finally:
        for r in runs.values():
            r["bg"].stop()


# ----------------------------------------------------------------------------------------------
# Quantization of one matrix


def sample_matrix(cols: int = 512) -> tuple[torch.Tensor, list[int]]:
    """Gaussian, Laplace and Student-t rows, an all-zero row, huge single outliers, a constant row and a
    row of tiny magnitude (fp16-subnormal scales). Returns (matrix, indices of the heavy-tailed rows)."""
    rng = np.random.default_rng(1234)
    rows, heavy = [], []
    rows += list(rng.standard_normal((8, cols)) * 0.02)
    for df in (1.5, 2.0, 3.0):
        heavy += list(range(len(rows), len(rows) + 8))
        rows += list(rng.standard_t(df, (8, cols)) * 0.02)
    heavy += list(range(len(rows), len(rows) + 8))
    rows += list(rng.laplace(size=(8, cols)) * 0.02)
    rows.append(np.zeros(cols))
    for sign, pos in ((1.0, 7), (-1.0, cols - 1)):
        r = rng.standard_normal(cols) * 0.02
        r[pos] = sign * 50.0  # 2500 standard deviations
        rows.append(r)
    rows.append(np.full(cols, -0.3))
    rows.append(rng.standard_normal(cols) * 1e-6)
    return torch.tensor(np.stack(rows), dtype=torch.float32), heavy


def row_sq_err(q: torch.Tensor, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (q.double() * s.double()[:, None] - w.double()).square().sum(dim=1)


def quantize_with_ratio(w: torch.Tensor, qmax: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: one fixed clip ratio, the scale rounded to fp16 as it would be stored."""
    scale = (w.abs().amax(dim=1) * ratio / qmax).half().float().clamp_min(2.0 ** -24)
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)
    return q, scale


def finest_codes(w: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rounding at finest_steps, as the export rounds a matrix it has no Gram matrix for."""
    s = T.finest_steps(w, qmax)
    return torch.clamp(torch.round(w / s[:, None]), -qmax, qmax).to(torch.int8), s.half()


@pytest.mark.parametrize("qmax", [15, 31])
@pytest.mark.parametrize("cols", [512, 301])
def test_finest_steps_within_half_step_of_clipped_original(qmax, cols):
    w, _ = sample_matrix(cols)
    assert torch.equal(T.finest_steps(w, qmax), T.finest_steps(w, qmax).half().float())  # fp16 exactly
    q, s = finest_codes(w, qmax)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float16 and s.shape == (w.shape[0],)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert int(q.abs().max()) <= qmax
    sd = s.double()[:, None]
    clipped = torch.minimum(torch.maximum(w.double(), -qmax * sd), qmax * sd)
    err = (q.double() * sd - clipped).abs()
    bound = sd / 2 * (1 + 1e-5) + 1e-12
    worst = (err / sd).max().item()
    assert (err <= bound).all(), f"worst |q*s - clip(w)| = {worst:.6f} steps (> 0.5)"
    # the all-zero row stays exactly zero; the constant row is reproduced to within fp16 precision
    zero_row = w.abs().sum(dim=1) == 0
    assert zero_row.sum() == 1 and (q[zero_row] == 0).all()
    const = (w == -0.3).all(dim=1)
    assert const.sum() == 1
    deq_const = q[const].double() * s[const].double()[:, None]
    assert (deq_const == deq_const[0, 0]).all() and abs(deq_const[0, 0].item() + 0.3) <= 0.3 * 2.0 ** -10


@pytest.mark.parametrize("qmax", [15, 31])
def test_clip_search_never_worse_than_row_max(qmax):
    w, heavy = sample_matrix()
    q, s = finest_codes(w, qmax)
    err = row_sq_err(q, s, w)
    base_q, base_s = quantize_with_ratio(w, qmax, 1.0)
    base = row_sq_err(base_q, base_s, w)
    assert (err <= base * (1 + 1e-6) + 1e-30).all(), (err / base.clamp_min(1e-30)).max()
    # it is the best of its own candidate ratios, too
    for ratio in T.CLIP_RATIOS:
        cq, cs = quantize_with_ratio(w, qmax, ratio)
        assert (err <= row_sq_err(cq, cs, w) * (1 + 1e-6) + 1e-30).all(), ratio
    # and clipping pays off on heavy-tailed rows
    h = torch.tensor(heavy)
    better = err[h] < base[h] * (1 - 1e-3)
    gain = (err[h] / base[h]).mean().item()
    print(f"\nqmax {qmax}: heavy-tailed rows, mean squared-error ratio clip-search / row-max = {gain:.4f}")
    assert better.sum() >= len(heavy) // 2, f"only {int(better.sum())}/{len(heavy)} heavy rows improved"
    assert gain < 0.98, f"heavy-row squared error ratio vs row max {gain:.4f}"


def test_quant_levels_on_the_default_model(monkeypatch):
    for key in list(os.environ):
        if key.isupper() and key not in ("PATH", "HOME", "LANG", "PYTHONPATH"):
            monkeypatch.delenv(key)
    args = T.Hyperparameters()
    assert (args.num_layers, args.model_dim, args.vocab_size) == (10, 512, 1024)
    # names and shapes are all that matter here: skip the orthogonal init (QR of 60 matrices, seconds)
    monkeypatch.setattr(torch.nn.init, "orthogonal_", lambda t, *a, **k: t)
    state = T.GPT(args).state_dict()
    levels = {name: T.quant_levels(name, t) for name, t in state.items()}
    for name, t in state.items():
        if t.ndim != 2 or t.numel() <= 8192:
            assert levels[name] == 0, name
        elif ".mlp." in name:
            assert levels[name] == 15, name
        else:
            assert levels[name] == 31, name
    for i in range(args.num_layers):
        for part in ("fc", "proj"):
            assert levels[f"blocks.{i}.mlp.{part}.weight"] == 15
        for part in ("c_q", "c_k", "c_v", "proj"):
            assert levels[f"blocks.{i}.attn.{part}.weight"] == 31
    assert levels["bigram.proj.weight"] == 31
    assert levels["tok_emb.weight"] == 31  # the tied embedding starts at int6 too; the fit may move it to fp16 rows
    # the small tensors (norm scales, gates, lambdas, skip weights) are all kept in fp16
    small = [n for n, t in state.items() if t.numel() <= 8192]
    assert {"skip_weights", "blocks.1.vr_lambda", "smear.w", "bigram.scale", "blocks.4.resid_mix", "blocks.4.q_gain"} <= set(small)
    assert all(levels[n] == 0 for n in small)
    # nearly all of the parameters end up in int5/int6
    n_int = sum(t.numel() for n, t in state.items() if levels[n])
    n_all = sum(t.numel() for t in state.values())
    assert n_int / n_all > 0.9


# ----------------------------------------------------------------------------------------------
# Bad artifacts and settings at start-up (in-process)


def run_main_in_process(monkeypatch, capsys, corpus, cwd, **overrides):
    """train_gpt.main() in this process (no torch import to pay for): its exit code, stdout and stderr.
    Only for runs that stop at start-up, before any training or evaluation."""
    env = script_env(corpus, str(cwd), **overrides)
    for key in list(os.environ):
        if key not in env:
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = T.main()
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", ["contradiction", "random", "missing", "layer_order"])
def test_eval_only_startup_errors(monkeypatch, capsys, corpus, rt_artifact, tmp_path, case):
    """NUM_LAYERS=3 against a 2-layer artifact; random bytes; no file; a layer order that neither graph runs: exit
    2, one `error:` line naming NUM_LAYERS or the file, nothing evaluated."""
    path = tmp_path / "model.ptz"
    extra = {}
    if case == "contradiction":
        path.write_bytes(rt_artifact["blob"])
        extra["NUM_LAYERS"] = "3"
    elif case == "layer_order":
        frames = T.split_frames(rt_artifact["blob"])
        header = json.loads(zstandard.ZstdDecompressor().decompress(frames[0]))
        assert header["config"]["layer_order"] == [0, 1]  # built without the switch
        header["config"]["layer_order"] = [0, 0, 1]
        path.write_bytes(_join([_zstd(json.dumps(header).encode())] + frames[1:]))
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(rt_artifact["blob"])))
    code, out, err = run_main_in_process(monkeypatch, capsys, corpus, tmp_path, EVAL_ONLY=1, ARTIFACT_PATH=str(path),
                                         DEVICE="cpu", **RT_OVERRIDES, **extra)
    assert code == 2, out[-2000:] + err[-2000:]
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert ("NUM_LAYERS" if case == "contradiction" else str(path)) in errors[0], errors[0]
    assert "final_" not in out


def _zstd(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(raw)


def _join(frames: list[bytes]) -> bytes:
    return b"".join(len(f).to_bytes(4, "little") + f for f in frames)


CORRUPT_CASES = ("empty", "random", "truncated", "last_byte_cut", "zero_length_frame", "missing_tensor_frame",
                 "trailing_payload", "short_payload", "code_out_of_range", "unknown_layout", "not_json", "wrong_format",
                 "previous_format", "header_not_an_object")


def _corrupt_cases(blob: bytes) -> dict:
    frames = T.split_frames(blob)
    header = json.loads(zstandard.ZstdDecompressor().decompress(frames[0]))
    i = next(k for k, entry in enumerate(header["tensors"], 1) if entry[1] == "int")
    payload = zstandard.ZstdDecompressor().decompress(frames[i])

    def replaced(k: int, frame: bytes) -> bytes:
        return _join(frames[:k] + [frame] + frames[k + 1:])

    return {
        "empty": b"",
        "random": np.random.default_rng(3).bytes(2000),
        "truncated": blob[: len(blob) // 2],
        "last_byte_cut": blob[:-1],
        "zero_length_frame": blob + b"\0\0\0\0",
        "missing_tensor_frame": _join(frames[:-1]),
        "trailing_payload": replaced(i, _zstd(payload + b"\0")),
        "short_payload": replaced(i, _zstd(payload[:-2])),
        "code_out_of_range": replaced(i, _zstd(b"\x80" + payload[1:])),  # -128: beyond any range
        "unknown_layout": replaced(0, _zstd(json.dumps(dict(header, tensors=[
            [e[0], "int_triples" if k == i else e[1], *e[2:]] for k, e in enumerate(header["tensors"], 1)])).encode())),
        "not_json": replaced(0, _zstd(b"\xff\xfe\xfd\xfc")),
        "wrong_format": replaced(0, _zstd(json.dumps(dict(header, format="something-else")).encode())),
        "previous_format": replaced(0, _zstd(json.dumps(dict(header, format="pgolf-mixed-int-v5")).encode())),
        "header_not_an_object": replaced(0, _zstd(b"[]")),
    }


@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_deserialize_rejects_corrupt_artifacts(rt_artifact, tmp_path, case):
    path = tmp_path / "bad.ptz"
    cases = _corrupt_cases(rt_artifact["blob"])
    assert set(cases) == set(CORRUPT_CASES)
    path.write_bytes(cases[case])
    reason = {"code_out_of_range": "has codes beyond", "unknown_layout": "unknown layout 'int_triples'"}.get(case, "")
    with pytest.raises(T.UsageError, match=re.escape(str(path)) + ".*" + re.escape(reason)):
        T.deserialize_artifact(str(path))


@pytest.mark.parametrize("qmax,scale", [(15, 0.3), (15, 4.0), (31, 8.0), (63, 30.0), (127, 100.0)])
@pytest.mark.parametrize("numel", [1, 2, 4, 777, 4096])
def test_every_code_layout_reads_back(qmax, scale, numel):
    """One byte a code, and magnitudes grouped two and three to a byte (at and over their caps, a last group padded)
    read back exactly, stopping at their own end; a tensor's frame is that of its smallest layout."""
    g = torch.Generator().manual_seed(numel + qmax)
    q = torch.clamp(torch.round(torch.randn(numel, generator=g) * scale), -qmax, qmax).to(torch.int8).view(1, -1)
    layouts = T.code_layouts(q)
    assert list(layouts) == ["int", *T.MAGNITUDE_RADICES]
    for layout, streams in layouts.items():
        raw = b"".join(streams)
        codes, end = T.read_codes(raw + b"\x00\x01", layout, numel)
        assert end == len(raw) and np.array_equal(codes, q.flatten().numpy()), layout
    s = torch.rand(1, generator=g).half()
    frames = {k: T.zstd_frame(v + T.half_planes(s), T.ZSTD_SIZING) for k, v in layouts.items()}
    layout, frame = T.tensor_frame(q, s, T.ZSTD_SIZING)
    assert frame == frames[layout] and len(frame) == min(map(len, frames.values()))


def _forced_layout_artifact(layout, monkeypatch, tmp_path):
    g = torch.Generator().manual_seed(7)
    q = torch.clamp(torch.round(torch.randn(40, 51, generator=g) * 30), -127, 127).to(torch.int8)
    q[3] = 0  # the fp16 row
    s = torch.cat((torch.rand(40, generator=g).index_fill(0, torch.tensor([3]), 0.0), torch.randn(51, generator=g)))
    quantized = {"a.weight": ("int", 127, q, s.half()), "b": ("fp16", 0, torch.randn(7, generator=g).half(), None)}
    layouts = T.code_layouts
    monkeypatch.setattr(T, "code_layouts", lambda codes: {layout: layouts(codes)[layout]})
    path = tmp_path / "a.ptz"
    path.write_bytes(T.serialize_artifact(quantized, {"k": 1}))
    return path, quantized


@pytest.mark.parametrize("layout", ["int", *T.MAGNITUDE_RADICES])
def test_an_artifact_reads_back_in_every_layout(layout, monkeypatch, tmp_path):
    """Whatever layout a tensor's codes take, the artifact reader rebuilds the same weights: codes over the caps, an
    fp16 row (step 0, its values after the steps) and an fp16 tensor."""
    path, quantized = _forced_layout_artifact(layout, monkeypatch, tmp_path)
    config, state = T.deserialize_artifact(str(path))
    assert config == {"k": 1} and json.loads(zstandard.ZstdDecompressor().decompress(T.split_frames(
        path.read_bytes())[0]))["tensors"][0][1] == layout
    assert torch.equal(state["a.weight"], T.dequantize(*quantized["a.weight"][2:]))
    assert torch.equal(state["b"], quantized["b"][2].float())


@pytest.mark.parametrize("case,reason", [("symbol", "a mag3 symbol beyond 251"), ("count", "magnitudes over the caps"),
                                         ("over", "has codes beyond")])
def test_corrupt_grouped_codes_are_named(case, reason, monkeypatch, tmp_path):
    """A symbol no group of radices 7, 6, 6 makes, a wrong count of magnitudes over the caps, and a magnitude
    beyond the tensor's range each make the artifact corrupt."""
    path, _ = _forced_layout_artifact("mag3", monkeypatch, tmp_path)
    frames = T.split_frames(path.read_bytes())
    raw = bytearray(zstandard.ZstdDecompressor().decompress(frames[1]))
    n_over = int.from_bytes(raw[:4], "little")
    if case == "symbol":
        raw[4 + n_over] = 255
    elif case == "count":
        raw[:4] = (n_over - 1).to_bytes(4, "little")
    else:
        raw[4] = 200  # the first magnitude over a cap: 200 more than 6 or 5
    path.write_bytes(_join([frames[0], _zstd(bytes(raw)), frames[2]]))
    with pytest.raises(T.UsageError, match=f"artifact {re.escape(str(path))} is corrupt .*{reason}"):
        T.deserialize_artifact(str(path))


@pytest.mark.parametrize("qmax,ratio", [(15, 2.0), (31, 4.0)])
def test_grouped_magnitudes_reach_the_entropy(qmax, ratio):
    """Peaked codes (gaussian 512 x 512, steps `ratio` x the finest: ~3.3 bits a code, as the fit puts the int5 and int6
    matrices at the cap): one byte a code costs zstd over 1.01 x their order-0 entropy, the layout chosen under it."""
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    q = torch.clamp(torch.round(w / (w.abs().amax(1, keepdim=True) / qmax * ratio)), -qmax, qmax).to(torch.int8)
    counts = torch.bincount(q.flatten().long() + qmax).double()
    p = counts[counts > 0] / q.numel()
    entropy_bytes = float(-(p * p.log2()).sum()) * q.numel() / 8
    sizes = {k: len(T.zstd_frame(v)) for k, v in T.code_layouts(q).items()}
    layout = T.tensor_frame(q, torch.ones(512).half())[0]
    assert sizes[layout] <= 1.01 * entropy_bytes < sizes["int"], {k: v / entropy_bytes for k, v in sizes.items()}


def test_an_artifact_of_the_previous_format_is_named_as_such(rt_artifact, tmp_path):
    path = tmp_path / "v3.ptz"
    path.write_bytes(_corrupt_cases(rt_artifact["blob"])["previous_format"])
    with pytest.raises(T.UsageError, match=f"artifact {re.escape(str(path))} is corrupt .*not a pgolf-mixed-int-v6"):
        T.deserialize_artifact(str(path))


def test_deserialize_missing_artifact(tmp_path):
    path = tmp_path / "nope.ptz"
    with pytest.raises(T.UsageError, match=re.escape(str(path))):
        T.deserialize_artifact(str(path))


# ----------------------------------------------------------------------------------------------
# Round trip through a file, read back in a fresh process

def logits_of(model, idx):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model.eval().logits(model.hidden(idx))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def roundtrip(rt_artifact, background):
    """The quantized model built in this process, and what a separate Python process read back from the file."""
    a = rt_artifact
    qmodel = T.GPT(a["args"])
    qmodel.load_state_dict(dequantize_state(a["quantized"]))
    here = {"plain": logits_of(a["model"], a["idx"]), "quant": logits_of(qmodel, a["idx"])}
    proc = background["child"].result()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return dict(a, here=here, child=torch.load(a["dir"] / "out.pt"), child_blob=(a["dir"] / "blob2.ptz").read_bytes())


def test_roundtrip_quantizes_both_kinds(roundtrip):
    """Matrices are int codes in their default range (int5 MLP, int6 attention and the embedding) or one the fit
    moved them up to, with rows of the embedding maybe kept in fp16 (step 0, values after the steps); the small
    tensors stay fp16."""
    kinds = {name: (kind, qmax) for name, (kind, qmax, _, _) in roundtrip["quantized"].items()}
    assert kinds["blocks.0.attn.c_q.weight"][0] == kinds["blocks.1.mlp.proj.weight"][0] == "int"
    assert kinds["tok_emb.weight"][0] == "int"
    for name, (kind, qmax, q, s) in roundtrip["quantized"].items():
        t = roundtrip["state"][name]
        default = T.quant_levels(name, t)
        assert qmax == default or (default and qmax in T.QMAX_LADDER and qmax > default), name
        if kind == "int":
            fp16_rows = s[:len(q)] == 0
            assert q.dtype == torch.int8 and s.dtype == torch.float16 and int(q.abs().max()) <= qmax
            assert s.shape == (t.shape[0] + int(fp16_rows.sum()) * t.shape[1],) and not q[fp16_rows].any()
            assert name in T.FP16_ROWS or not fp16_rows.any()
            assert torch.equal(T.dequantize(q, s)[fp16_rows], t[fp16_rows].half().float())
        else:
            assert q.dtype == torch.float16 and s is None


def test_fresh_process_reproduces_quantized_logits_exactly(roundtrip):
    child, here = roundtrip["child"], roundtrip["here"]
    assert child["config"] == roundtrip["args"].model_config()
    deq = dequantize_state(roundtrip["quantized"])
    assert set(child["state"]) == set(deq)
    for name in deq:
        assert torch.equal(child["state"][name], deq[name]), name
    assert torch.equal(child["logits"], here["quant"])
    diff = (here["quant"] - here["plain"]).abs()
    centered = here["plain"] - here["plain"].mean(dim=-1, keepdim=True)
    rel = (diff.norm() / centered.norm()).item()
    print(f"\nquantized-vs-plain logits: max_abs_diff={diff.max().item():.4f} relative_l2={rel:.4f} "
          f"logit_std={centered.std().item():.4f}")
    assert diff.max() > 0, "quantization changed nothing: the int matrices were not quantized"
    assert rel < 0.3  # a random model fit to 85% of its finest size: coarse steps, but the same logits roughly


def test_dequantized_weights_close_to_originals(roundtrip):
    deq = dequantize_state(roundtrip["quantized"])
    worst = {}
    for name, (kind, qmax, _, _) in roundtrip["quantized"].items():
        w = roundtrip["state"][name].float()
        rel = ((deq[name] - w).norm() / w.norm()).item()
        # fp16: rounding only; int: steps coarser than the finest, as the limit binds (at most half a row max)
        limit = 1e-3 if qmax == 0 else 0.25
        assert 0 < rel < limit, (name, kind, rel)
        worst[qmax] = max(worst.get(qmax, 0.0), rel)
    print("\nworst per-tensor relative L2 weight error: " +
          " ".join(f"{'fp16' if k == 0 else f'int{T.QMAX_LADDER.index(k) + 5}'}:{v:.5f}" for k, v in sorted(worst.items())))


# ----------------------------------------------------------------------------------------------
# Determinism


def test_serialization_is_deterministic(roundtrip):
    state, args, blob = roundtrip["state"], roundtrip["args"], roundtrip["blob"]
    # same weights (cloned, and in another insertion order) and the same limit: the same bytes
    shuffled = {k: state[k].clone() for k in reversed(list(state))}
    assert T.BudgetFit(shuffled, None).fit(roundtrip["limit"], args.model_config(), False)[0] == blob
    assert T.serialize_artifact(roundtrip["quantized"], args.model_config()) == blob
    # a fresh process fitting the same saved state to the same limit writes the same bytes
    assert roundtrip["child_blob"] == blob
    # a sorted JSON header, then the tensors in sorted name order, each its own zstd-22 frame holding its codes,
    # then the low and the high bytes of its fp16 part, each stream in blocks of its own
    frames = T.split_frames(blob)
    raw = [zstandard.ZstdDecompressor().decompress(f) for f in frames]
    header = json.loads(raw[0])
    assert raw[0] == json.dumps(header, sort_keys=True).encode()
    assert [e[0] for e in header["tensors"]] == sorted(state) and len(frames) == len(state) + 1
    assert header["config"] == args.model_config()
    framed = [T.tensor_frame(q, s) for (_, _, q, s) in roundtrip["quantized"].values()]
    assert [T.zstd_frame([raw[0]])] + [f for _, f in framed] == frames
    assert [layout for _, layout, *_ in header["tensors"]] == [layout for layout, _ in framed]
    for (kind, _, q, s), (layout, _), r in zip(roundtrip["quantized"].values(), framed, raw[1:]):
        half = (q if kind == "fp16" else s).flatten().numpy().view(np.uint8)
        codes = [] if kind == "fp16" else T.code_layouts(q)[layout]  # the layout whose frame is smallest
        assert r == b"".join(codes) + half[0::2].tobytes() + half[1::2].tobytes() and (layout == "fp16") == (not codes)


def test_reexport_of_a_loaded_artifact(roundtrip, tmp_path):
    """At the finest plan quantization is idempotent: a loaded artifact exported again is the same bytes.
    At a binding limit the steps depend on the weights, so a re-export may differ (or land on the same grid),
    but it still fits."""
    config = roundtrip["args"].model_config()
    for limit, identical in ((10 ** 9, True), (roundtrip["limit"], None)):
        blob = T.BudgetFit(roundtrip["state"], None).fit(limit, config, False)[0]
        path = tmp_path / f"a{limit}.ptz"
        path.write_bytes(blob)
        loaded_config, state = T.deserialize_artifact(str(path))
        assert loaded_config == config
        again = T.BudgetFit(state, None).fit(limit, config, False)[0]
        assert identical is None or (again == blob) == identical
        assert len(again) <= limit


# ----------------------------------------------------------------------------------------------
# Byte accounting and the cap


def artifact_line(text: str):
    found = ARTIFACT_RE.findall(text)
    assert len(found) == 1, found
    code, model, total, path, rest = found[0]
    return int(code), int(model), int(total), path, rest


def test_byte_accounting_in_log_and_submission(trained_run):
    log = trained_run["log"].read_text(encoding="utf-8")
    code, model, total, path, _ = artifact_line(log)
    assert artifact_line(trained_run["stdout"])[:4] == (code, model, total, path)
    assert os.path.samefile(path, trained_run["artifact"])
    assert model == os.path.getsize(trained_run["artifact"])
    with open(SCRIPT, encoding="utf-8") as f:
        assert code == len(f.read().encode("utf-8")) == os.path.getsize(SCRIPT)
    assert total == code + model
    with open(trained_run["cwd"] / "submission.json", encoding="utf-8") as f:
        sub = json.load(f)
    assert (sub["bytes_code"], sub["bytes_model"], sub["bytes_total"]) == (code, model, total)
    assert total <= 16_000_000


def test_bytes_per_parameter(trained_run):
    _, model_bytes, _, _, rest = artifact_line(trained_run["stdout"])
    n_params = sum(p.numel() for p in T.GPT(tiny_args()).parameters())
    assert f"model_params:{n_params} " in trained_run["stdout"] and rest == ""
    bpp = model_bytes / n_params
    print(f"\ntrained tiny model: {model_bytes} bytes / {n_params} params = {bpp:.4f} bytes per parameter")
    assert bpp < 2.0


def test_roundtrip_bpb_close_to_prequant(trained_run):
    f = trained_run["finals"]
    pre, rt = f["prequant"], f["roundtrip"]
    print(f"\nprequant val_bpb:{pre['val_bpb']:.8f} roundtrip val_bpb:{rt['val_bpb']:.8f} "
          f"delta:{rt['val_bpb'] - pre['val_bpb']:+.2e}")
    assert (pre["tokens"], pre["bytes"]) == (rt["tokens"], rt["bytes"])
    assert abs(rt["val_bpb"] - pre["val_bpb"]) < 0.01 * pre["val_bpb"]


def test_export_work_runs_on_rank_0_only(monkeypatch, tmp_path):
    """The fit (quantization, GPTQ, zstd) runs once, on rank 0; another rank neither computes nor writes."""
    import types
    args = tiny_args(ARTIFACT_PATH=str(tmp_path / "a.ptz"))
    calls, real = [], T.BudgetFit.fit
    monkeypatch.setattr(T.BudgetFit, "fit", lambda self, *a: calls.append(1) or real(self, *a))
    model = T.GPT(args)
    for master in (False, True):
        rt = types.SimpleNamespace(master=master, world_size=1, device=torch.device("cpu"), all_reduce=lambda t, op=None: t)
        T.export_artifact(model, args, rt, None, lambda *a, **k: None)
        assert calls == [1] * master and (tmp_path / "a.ptz").exists() == master


def test_over_the_limit_is_a_clear_failure_and_leaves_no_artifact(background):
    """ARTIFACT_LIMIT_BYTES=1000 is below even the code's size: the fit cannot succeed, says so in one
    error line, and a stale artifact from an earlier run at ARTIFACT_PATH is gone, not left to mislead."""
    over_limit_run = background["over_limit"]
    proc = over_limit_run.result()
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "cannot fit" in errors[0] and "ARTIFACT_LIMIT_BYTES=1000" in errors[0]
    cwd = over_limit_run.cwd
    assert not os.path.exists(os.path.join(cwd, "final_model.ptz"))
    assert not re.search(r"^(artifact|export) ", proc.stdout, re.M)
    # the run is over before any score exists
    assert not os.path.exists(os.path.join(cwd, "submission.json"))
    assert "final_roundtrip" not in proc.stdout


# ----------------------------------------------------------------------------------------------
# The budget-fit export


@pytest.fixture(scope="module")
def fit_case(rt_artifact):
    fit = T.BudgetFit(rt_artifact["state"], None)
    config = rt_artifact["args"].model_config()
    coarsest = len(T.serialize_artifact(fit.quantize(math.exp(fit.bounds[1]), False), config))
    assert coarsest < 0.9 * rt_artifact["finest"]
    return fit, config, coarsest, rt_artifact["finest"]


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.7, 0.95, 1.0])
def test_any_limit_from_the_coarsest_to_the_finest_size_is_met(fit_case, frac):
    """Every limit between the coarsest plan's size (frac 0) and the finest plan's (frac 1) gives an
    artifact at or under it, and within 2 x FIT_MARGIN of it, as the whole budget is spent."""
    fit, config, coarsest, finest = fit_case
    limit = int(coarsest + frac * (finest - coarsest))
    blob, info = fit.fit(limit, config, False)
    assert limit * (1 - 2 * T.FIT_MARGIN) <= len(blob) <= limit, (len(blob), limit)
    assert 1 <= info["passes"] <= 3


def test_fit_with_calibration_and_gptq_at_a_binding_limit(rt_artifact):
    """The default export path under a cap that binds: Fisher steps from a real calibration, GPTQ codes,
    several passes. It lands in the window, the same bytes twice, and each linear layer's output error
    on the calibration inputs is well below plain rounding's at the same limit."""
    import types
    args = rt_artifact["args"]
    model = T.GPT(args)
    model.load_state_dict(rt_artifact["state"])
    rt = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext, sync=lambda: None,
                               all_reduce=lambda t, op=None: t)
    gen = torch.Generator().manual_seed(2)
    stats = T.calibrate(model, [(torch.randint(0, args.vocab_size, (4, 64), generator=gen), None)], rt, math.inf)
    limit = int(0.8 * rt_artifact["finest"])
    blob, info = T.BudgetFit(rt_artifact["state"], stats).fit(limit, args.model_config(), True)
    assert limit * (1 - 2 * T.FIT_MARGIN) <= len(blob) <= limit
    assert T.BudgetFit(rt_artifact["state"], stats).fit(limit, args.model_config(), True)[0] == blob
    plain = T.BudgetFit(rt_artifact["state"], stats).fit(limit, args.model_config(), False)[1]["quantized"]
    for name, st in stats["tensors"].items():
        if "gram" in st:  # the layer's output error on the calibration inputs: GPTQ's objective
            w = rt_artifact["state"][name]
            err = {k: float(torch.einsum("ij,jk,ik->", d, st["gram"], d)) for k, d in
                   (("gptq", dequantize_state({name: info["quantized"][name]})[name] - w),
                    ("plain", dequantize_state({name: plain[name]})[name] - w))}
            assert err["gptq"] < 0.8 * err["plain"], (name, err)  # observed 0.29-0.58


def test_a_limit_below_the_coarsest_size_is_a_clear_error(fit_case):
    fit, config, coarsest, _ = fit_case
    with pytest.raises(T.EvalFailure, match="cannot fit.*no artifact written"):
        fit.fit(int(0.97 * coarsest), config, False)  # near the coarsest plan, sizes need not fall with c byte by byte


def test_the_embedding_joins_the_fit_row_by_row(tmp_path):
    """The tied embedding is fitted like the matrices, from its Fisher statistics, and a row that wants finer steps
    than int8's finest (c / sqrt(Fisher per weight) below it) stays fp16: at the finest plan all of them (the
    embedding exactly as fp16 stores it), at the coarsest none, in between fewer as c grows, so the size falls
    smoothly; the artifact reads those rows back bit for bit."""
    gen = torch.Generator().manual_seed(11)
    name, emb = "tok_emb.weight", torch.randn(256, 64, generator=gen) * 0.05
    fisher = torch.logspace(0, 2, 256, dtype=torch.float32) * 64  # row i more sensitive than row i - 1
    fit = T.BudgetFit({name: emb}, {"tensors": {name: {"fisher": fisher}}})
    finest_int8 = T.finest_steps(emb, 127)
    counts, sizes = [], []
    for lc in torch.linspace(fit.bounds[0], fit.bounds[1], 40).tolist():
        quantized = fit.quantize(math.exp(lc), False)
        kind, qmax, q, s = quantized[name]
        fp16_rows = s[:len(q)] == 0
        n = int(fp16_rows.sum())
        assert kind == "int" and torch.equal(fp16_rows, math.exp(lc) / (fisher / 64).sqrt() < finest_int8)
        counts.append(n)
        sizes.append(len(T.serialize_artifact(quantized, {"test": 1})))
        path = tmp_path / "emb.ptz"
        path.write_bytes(T.serialize_artifact(quantized, {"test": 1}))
        back = T.deserialize_artifact(str(path))[1][name]
        assert torch.equal(back, T.dequantize(q, s)) and torch.equal(back[fp16_rows], emb[fp16_rows].half().float())
    assert counts[0] == 256 and counts[-1] == 0 and counts == sorted(counts, reverse=True)
    assert len(set(counts)) >= 8  # row by row, not the whole tensor at once
    assert max(a - b for a, b in zip(sizes, sizes[1:])) < 0.15 * (sizes[0] - sizes[-1])


def test_steps_follow_the_fisher_information():
    """Each row's step is c / sqrt(Fisher per weight) wherever its range allows, so at equal bytes the
    Fisher-weighted loss is lower than when every weight counts the same."""
    gen = torch.Generator().manual_seed(5)
    name = "blocks.0.attn.c_q.weight"
    w = torch.randn(64, 256, generator=gen) * 0.05
    fisher = torch.where(torch.arange(64) < 32, 100.0, 1.0) * 256  # half the rows 100x more sensitive
    weighted, uniform = T.BudgetFit({name: w}, {"tensors": {name: {"fisher": fisher}}}), T.BudgetFit({name: w}, None)
    c = math.exp(0.3 * weighted.bounds[0] + 0.7 * weighted.bounds[1])  # a c with rows of both kinds inside the range
    _, qmax, _, s = weighted.quantize(c, False)[name]
    s = s.float()  # the row steps, exact in fp16
    free = (s > weighted.rows[name]["fine"][qmax] * 1.01) & (s < weighted.rows[name]["coarse"] * 0.99)
    assert free.sum() > 16
    want = T.fp16_scale(c / (fisher / 256).sqrt())
    assert torch.equal(s[free], want[free])
    assert float(s[32:].mean()) > 5 * float(s[:32].mean())
    config = {"test": 1}
    limit = int(0.7 * len(T.serialize_artifact(weighted.quantize(math.exp(weighted.bounds[0]), False), config)))
    loss = {}
    for key, fit in (("weighted", weighted), ("uniform", uniform)):
        blob, info = fit.fit(limit, config, False)
        deq = dequantize_state(info["quantized"])[name]
        loss[key] = float(((deq - w).square().sum(1) * fisher / 256).sum())
    assert loss["weighted"] < 0.8 * loss["uniform"], loss


def test_gptq_lowers_the_output_error_at_the_same_steps():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(96, 384, generator=gen) * 0.02
    x = torch.randn(4000, 384, generator=gen) @ (torch.randn(384, 384, generator=gen) / 20)  # correlated inputs
    gram = x.T @ x
    s = T.finest_steps(w, 15)
    plain = torch.clamp(torch.round(w / s[:, None]), -15, 15).to(torch.int8)
    gptq = T.gptq_codes(w[None], s[None], torch.tensor([15]), T.gptq_factor(gram)[None])[0]
    assert gptq.dtype == torch.int8 and int(gptq.abs().max()) <= 15

    def output_err(q):
        d = w - q.float() * s[:, None]
        return float(torch.einsum("ij,jk,ik->", d, gram, d))

    assert output_err(gptq) < 0.8 * output_err(plain)
    steps = s.half()
    assert len(T.tensor_frame(gptq, steps)[1]) < 1.05 * len(T.tensor_frame(plain, steps)[1])


def test_calibration_statistics(corpus):
    """The Gram matrix is exactly the sum of x^T x over the layer's inputs; the Fisher is positive in
    every row of every quantized matrix, the tied embedding's too, where the inputs use only half its rows (the
    head uses all); micro-batches stop at the deadline, the first always runs."""
    import types
    args = tiny_args()
    torch.manual_seed(0)
    model = T.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    rt = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext, sync=lambda: None,
                               all_reduce=lambda t, op=None: t)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, args.vocab_size // 2, (4, 64), generator=gen), None) for _ in range(3)]
    seen = []
    hook = model.blocks[1].mlp.proj.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().flatten(0, 1)))
    stats = T.calibrate(model, batches, rt, math.inf)
    hook.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(stats["tensors"]["blocks.1.mlp.proj.weight"]["gram"], x.T @ x, rtol=1e-4, atol=1e-4)
    assert stats["tokens"] == 3 * 4 * 64
    quantized = {n for n, t in model.state_dict().items() if T.quant_levels(n, t)}
    assert set(stats["tensors"]) == quantized and "tok_emb.weight" in quantized
    for name in quantized:
        f = stats["tensors"][name]["fisher"]
        assert f.shape == (model.state_dict()[name].shape[0],) and bool((f > 0).all()), name
    assert not any(p.grad is not None for p in model.parameters())
    assert T.calibrate(model, batches, rt, 0.0)["tokens"] == 4 * 64


def test_trained_run_export_line_and_what_the_artifact_holds(trained_run):
    """The export logs what it chose, and the bytes it reports are the file's. tools/inspect_artifact.py reads the
    choice back tensor by tensor: the tiny model's budget does not bind, so every quantized matrix moved up to int8
    (the finest steps there are) and every row of the embedding is kept in fp16 (a step of 0)."""
    m = re.search(r"^export bytes_model:(\d+) predicted:(\d+) limit:(\d+) passes:(\d+) c:(\S+) gptq:1 "
                  r"calib_tokens:(\d+) export_ms:(\d+)$", trained_run["stdout"], re.M)
    assert m, trained_run["stdout"][-3000:]
    assert int(m.group(1)) == os.path.getsize(trained_run["artifact"]) <= int(m.group(3))
    assert int(m.group(6)) == int(TINY["TRAIN_BATCH_TOKENS"])
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import inspect_artifact
    rows = inspect_artifact.inspect(str(trained_run["artifact"]))
    header, _ = T.read_artifact(str(trained_run["artifact"]))
    assert sum(r["bytes"] for r in rows) + 4 + len(T.split_frames(trained_run["artifact"].read_bytes())[0]) == \
        os.path.getsize(trained_run["artifact"]) and len(rows) == len(header["tensors"])
    assert {f"{r['name']}:{r['qmax']}" + (f"+fp16_rows:{r['fp16_rows']}" if r["fp16_rows"] else "")
            for r in rows if r["moved"]} == {f"blocks.{i}.{p}.weight:127" for i in range(2) for p in (
                "mlp.fc", "mlp.proj", "attn.c_q", "attn.proj")} | {f"tok_emb.weight:127+fp16_rows:{TINY['VOCAB_SIZE']}"}
    bits = inspect_artifact.group_bits(rows)
    assert set(bits) == {"attn", "bigram", "embed", "mlp", "other"} and 0 < bits["mlp"] < 8
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inspect_artifact.py"),
                           str(trained_run["artifact"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^tok_emb.weight layout:\S+ range:int8 bytes:\d+ bits_per_weight:\S+ fp16_rows:\d+ moved$",
                     proc.stdout, re.M) and re.search(r"^bits_per_weight attn:\S+ bigram:\S+ embed", proc.stdout, re.M)


# ----------------------------------------------------------------------------------------------
# EVAL_ONLY


def assert_reproduces(run, trained_run, original):
    proc = run["proc"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got, want = finals(proc.stdout), trained_run["finals"]
    assert set(got) == {"roundtrip", "sliding", "ngram"}
    for kind in got:
        assert {k: got[kind][k] for k in COMPARED} == {k: want[kind][k] for k in COMPARED}, kind
    assert not re.search(r"^step:", proc.stdout, re.M), "EVAL_ONLY trained"
    assert run["path"].read_bytes() == original, "EVAL_ONLY rewrote the artifact"


def test_eval_only_reproduces_the_training_run(eval_only_runs, trained_run):
    """The artifact carries every shape setting but VOCAB_SIZE, which stays in the environment here, and the order
    its layers ran in: the tiny run switched its repeat on (layers 0 and 1 of 2, from step 5 of 10), so the
    rebuilt model runs them twice, with their own second-pass scalars."""
    assert re.search(r"^recurrence:on step:5 ", trained_run["stdout"], re.M)
    header, _ = T.read_artifact(str(trained_run["artifact"]))
    assert header["config"]["layer_order"] == [0, 1, 0, 1] and header["config"]["recur_layers"] == [0, 1]
    assert_reproduces(eval_only_runs["runs"]["vocab_only"], trained_run, eval_only_runs["original"])


def test_eval_only_needs_only_artifact_data_and_tokenizer(eval_only_runs, trained_run):
    """No shape variable at all: everything, VOCAB_SIZE included, must come from the artifact."""
    assert_reproduces(eval_only_runs["runs"]["no_shape_vars"], trained_run, eval_only_runs["original"])


def test_eval_only_truncated_artifact_is_a_clear_error(background):
    proc = background["truncated"].result()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and str(background["truncated"].path) in errors[0], proc.stderr[-2000:]
    assert "final_" not in proc.stdout
