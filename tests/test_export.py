"""Export: per-row int5/int6 quantization with a clip search, deterministic zstd serialization, the
byte accounting, the over-the-cap failure, and evaluating an existing artifact (EVAL_ONLY).

Subprocess runs are few and overlapped: the fresh-process round trip, the over-the-cap run and an
EVAL_ONLY run on a truncated artifact start in the background when this module starts; the two EVAL_ONLY
runs on the trained artifact start together once the shared `trained_run` exists. Start-up errors that
need no training are checked by calling train_gpt.main() in this process."""
from __future__ import annotations

import json
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
              "XSA_LAST_N", "BIGRAM_VOCAB_SIZE", "BIGRAM_DIM")
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


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def env_without_shape(corpus, cwd, keep=(), **overrides) -> dict:
    env = script_env(corpus, str(cwd), **overrides)
    for key in SHAPE_VARS:
        if key not in keep:
            env.pop(key, None)
    return env


RT_OVERRIDES = {"MODEL_DIM": "128"}  # big enough that MLP and attention matrices become int5/int6

CHILD = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    import train_gpt as T
    tokens_path, out_path, state_path, blob_path = sys.argv[2:6]
    args = T.Hyperparameters()
    config, state = T.deserialize_artifact(args.artifact_path)
    model = T.load_artifact_model(args, T.Runtime("cpu"))
    with torch.no_grad():
        logits = model.logits(model.hidden(torch.load(tokens_path)))
    torch.save({"logits": logits, "config": config, "state": state}, out_path)
    src = torch.load(state_path)
    with open(blob_path, "wb") as f:
        f.write(T.serialize_artifact(T.quantize_state(src), args.model_config()))
""")


@pytest.fixture(scope="module")
def rt_artifact(tmp_path_factory):
    """A tiny model (MODEL_DIM=128) with random non-zero weights, quantized and serialized in-process."""
    d = tmp_path_factory.mktemp("roundtrip")
    args = tiny_args(**RT_OVERRIDES)
    gen = torch.Generator().manual_seed(7)
    model = T.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    quantized = T.quantize_state(state)
    blob = T.serialize_artifact(quantized, args.model_config())
    (d / "model.ptz").write_bytes(blob)
    torch.save(state, d / "state.pt")
    idx = torch.randint(0, args.vocab_size, (3, 64), generator=gen)
    torch.save(idx, d / "tokens.pt")
    (d / "child.py").write_text(CHILD)
    return {"dir": d, "args": args, "model": model, "state": state, "quantized": quantized, "blob": blob, "idx": idx}


@pytest.fixture(scope="module", autouse=True)
def background(corpus, rt_artifact, tmp_path_factory):
    """Subprocesses that need neither each other nor the trained run, started when the module starts:
    the fresh-process round trip, the over-the-cap run, and EVAL_ONLY with a truncated artifact."""
    procs = {}
    d = rt_artifact["dir"]
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    env.update(TINY, **RT_OVERRIDES, ARTIFACT_PATH=str(d / "model.ptz"), DEVICE="cpu", OMP_NUM_THREADS="1")
    procs["child"] = Background(d / "child", env, [sys.executable, str(d / "child.py"), ROOT, str(d / "tokens.pt"),
                                                   str(d / "out.pt"), str(d / "state.pt"), str(d / "blob2.ptz")])
    cwd = tmp_path_factory.mktemp("over_limit")
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


@pytest.mark.parametrize("qmax", [15, 31])
@pytest.mark.parametrize("cols", [512, 301])
def test_quantize_rows_within_half_step_of_clipped_original(qmax, cols):
    w, _ = sample_matrix(cols)
    q, s = T.quantize_rows(w, qmax)
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
    # dequantize_state rebuilds exactly q * s
    deq = T.dequantize_state({"m": ("int", qmax, q, s)})["m"]
    assert torch.equal(deq, q.float() * s.float()[:, None])


@pytest.mark.parametrize("qmax", [15, 31])
def test_clip_search_never_worse_than_row_max(qmax):
    w, heavy = sample_matrix()
    q, s = T.quantize_rows(w, qmax)
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
        if name == "tok_emb.weight" or t.ndim != 2 or t.numel() <= 8192:
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
    assert levels["tok_emb.weight"] == 0
    # the small tensors (norm scales, gates, lambdas, skip weights) are all kept in fp16
    small = [n for n, t in state.items() if t.numel() <= 8192]
    assert {"skip_weights", "vr_lambda", "smear.w", "bigram.scale", "blocks.0.resid_mix"} <= set(small)
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


@pytest.mark.parametrize("case", ["contradiction", "random", "missing"])
def test_eval_only_startup_errors(monkeypatch, capsys, corpus, rt_artifact, tmp_path, case):
    """NUM_LAYERS=3 against a 2-layer artifact; random bytes; no file: exit 2, one `error:` line naming
    NUM_LAYERS or the file, nothing evaluated."""
    path = tmp_path / "model.ptz"
    extra = {}
    if case == "contradiction":
        path.write_bytes(rt_artifact["blob"])
        extra["NUM_LAYERS"] = "3"
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


CORRUPT_CASES = ("empty", "random", "truncated", "last_byte_cut", "trailing_payload", "short_payload", "not_json",
                 "wrong_format", "header_not_an_object")


def _corrupt_cases(blob: bytes) -> dict:
    raw = zstandard.ZstdDecompressor().decompress(blob)

    def with_header(header) -> bytes:
        h = json.dumps(header).encode()
        return _zstd(len(h).to_bytes(4, "little") + h)

    return {
        "empty": b"",
        "random": np.random.default_rng(3).bytes(2000),
        "truncated": blob[: len(blob) // 2],
        "last_byte_cut": blob[:-1],
        "trailing_payload": _zstd(raw + b"\0"),
        "short_payload": _zstd(raw[:-2]),
        "not_json": _zstd(b"\x04\x00\x00\x00\xff\xfe\xfd\xfc"),
        "wrong_format": with_header({"format": "something-else", "config": {}, "tensors": []}),
        "header_not_an_object": with_header([]),
    }


@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_deserialize_rejects_corrupt_artifacts(rt_artifact, tmp_path, case):
    path = tmp_path / "bad.ptz"
    cases = _corrupt_cases(rt_artifact["blob"])
    assert set(cases) == set(CORRUPT_CASES)
    path.write_bytes(cases[case])
    with pytest.raises(T.UsageError, match=re.escape(str(path))):
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
    qmodel.load_state_dict(T.dequantize_state(a["quantized"]))
    here = {"plain": logits_of(a["model"], a["idx"]), "quant": logits_of(qmodel, a["idx"])}
    proc = background["child"].result()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return dict(a, here=here, child=torch.load(a["dir"] / "out.pt"), child_blob=(a["dir"] / "blob2.ptz").read_bytes())


def test_roundtrip_quantizes_both_kinds(roundtrip):
    kinds = {name: (kind, qmax) for name, (kind, qmax, _, _) in roundtrip["quantized"].items()}
    assert kinds["blocks.0.mlp.fc.weight"] == ("int", 15)
    assert kinds["blocks.1.mlp.proj.weight"] == ("int", 15)
    assert kinds["blocks.0.attn.c_q.weight"] == ("int", 31)
    assert kinds["tok_emb.weight"] == ("fp16", 0)
    for name, (kind, qmax, q, s) in roundtrip["quantized"].items():
        t = roundtrip["state"][name]
        assert qmax == T.quant_levels(name, t)
        if kind == "int":
            assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (t.shape[0],)
        else:
            assert q.dtype == torch.float16 and s is None


def test_fresh_process_reproduces_quantized_logits_exactly(roundtrip):
    child, here = roundtrip["child"], roundtrip["here"]
    assert child["config"] == roundtrip["args"].model_config()
    deq = T.dequantize_state(roundtrip["quantized"])
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
    assert rel < 0.10


def test_dequantized_weights_close_to_originals(roundtrip):
    deq = T.dequantize_state(roundtrip["quantized"])
    worst = {}
    for name, (kind, qmax, _, _) in roundtrip["quantized"].items():
        w = roundtrip["state"][name].float()
        rel = ((deq[name] - w).norm() / w.norm()).item()
        # uniform-grid noise is about step/sqrt(12) with step <= row max / qmax
        limit = {0: 1e-3, 31: 0.04, 15: 0.08}[qmax]
        assert 0 < rel < limit, (name, kind, rel)
        worst[qmax] = max(worst.get(qmax, 0.0), rel)
    print("\nworst per-tensor relative L2 weight error: " +
          " ".join(f"{ {0: 'fp16', 15: 'int5', 31: 'int6'}[k]}:{v:.5f}" for k, v in sorted(worst.items())))


# ----------------------------------------------------------------------------------------------
# Determinism


def test_serialization_is_deterministic(roundtrip):
    state, args, blob = roundtrip["state"], roundtrip["args"], roundtrip["blob"]
    # same weights (cloned, and in another insertion order), same bytes
    shuffled = {k: state[k].clone() for k in reversed(list(state))}
    assert T.serialize_artifact(T.quantize_state(shuffled), args.model_config()) == blob
    # a fresh process serializing the same saved state writes the same bytes
    assert roundtrip["child_blob"] == blob
    # the header is sorted JSON, and the tensors come in sorted name order
    raw = zstandard.ZstdDecompressor().decompress(blob)
    n = int.from_bytes(raw[:4], "little")
    header = json.loads(raw[4:4 + n])
    assert raw[4:4 + n] == json.dumps(header, sort_keys=True).encode()
    names = [e[0] for e in header["tensors"]]
    assert names == sorted(state)
    assert header["config"] == args.model_config()
    # zstd level 22: recompressing the raw payload at that level gives back the same bytes
    assert zstandard.ZstdCompressor(level=22).compress(raw) == blob


def test_reexport_of_a_loaded_artifact_is_byte_identical(roundtrip, trained_run, tmp_path):
    """Quantization is idempotent: the dequantized weights re-quantize to the same integers and scales."""
    cases = [(roundtrip["blob"], roundtrip["args"].model_config()),
             (trained_run["artifact"].read_bytes(), tiny_args().model_config())]
    for i, (blob, expect_config) in enumerate(cases):
        path = tmp_path / f"a{i}.ptz"
        path.write_bytes(blob)
        config, state = T.deserialize_artifact(str(path))
        assert config == expect_config
        assert T.serialize_artifact(T.quantize_state(state), config) == blob


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
    assert f"model_params:{n_params} " in trained_run["stdout"]
    bpp = model_bytes / n_params
    logged = re.search(r"bytes_per_param:(\S+)", rest)
    assert logged and abs(float(logged.group(1)) - bpp) < 1e-4
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
    """Quantization and zstd run once, on rank 0; another rank neither computes nor writes anything."""
    import types
    args = tiny_args(ARTIFACT_PATH=str(tmp_path / "a.ptz"))
    calls = []
    real = T.quantize_state
    monkeypatch.setattr(T, "quantize_state", lambda state: calls.append(1) or real(state))
    model = T.GPT(args)
    T.export_artifact(model, args, types.SimpleNamespace(master=False, world_size=1))
    assert calls == [] and not (tmp_path / "a.ptz").exists()
    T.export_artifact(model, args, types.SimpleNamespace(master=True, world_size=1))
    assert calls == [1] and (tmp_path / "a.ptz").stat().st_size > 0


def test_over_the_limit_is_a_clear_failure(background):
    over_limit_run = background["over_limit"]
    proc = over_limit_run.result()
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "limit" in errors[0] and "ARTIFACT_LIMIT_BYTES=1000" in errors[0]
    cwd = over_limit_run.cwd
    artifact = os.path.join(cwd, "final_model.ptz")
    assert os.path.isfile(artifact)
    log = open(os.path.join(cwd, "logs", "test.txt"), encoding="utf-8").read()
    code, model, total, _, _ = artifact_line(log)
    assert model == os.path.getsize(artifact) and total == code + model and total > 1000
    # the run is over before any score exists
    assert not os.path.exists(os.path.join(cwd, "submission.json"))
    assert "final_roundtrip" not in proc.stdout


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
    """The artifact carries every shape setting but VOCAB_SIZE, which stays in the environment here."""
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
