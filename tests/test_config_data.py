"""Configuration validation, data checks, byte accounting, logging, and distributed consistency.

Bad inputs: every case runs as its own process with the environment that `script_env` builds.
Starting a fresh interpreter costs ~3-4 s on this 2-core machine (almost all of it `import torch`),
and there are ~30 cases, so most cases go through `_fork_runner`: one interpreter imports
train_gpt once, then forks one child per case. Each child gets the case's environment and cwd,
has its fd 1/2 redirected to files, and runs `train_gpt.main()` the way `python train_gpt.py` does
(an exception that escapes main prints a traceback and exits 1). A few cases also run as real
`python train_gpt.py` subprocesses through `run_script`, and those must give the same exit code and
error line as their forked runs, so the two paths are checked against each other.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import sentencepiece as spm
import torch

import build_corpus
from conftest import (ROOT, SCRIPT, TINY, VOCAB, command, contract_record, finals, run_script, script_env, step_losses,
                      tiny_args)

import train_gpt

HEADER_BYTES = 1024
SEQ_LEN = int(TINY["TRAIN_SEQ_LEN"])


# ----------------------------------------------------------------------------------------------
# Helpers


def _read_shard(path: str) -> np.ndarray:
    """Tokens of a shard read directly with numpy (independent of train_gpt)."""
    header = np.fromfile(path, dtype="<i4", count=256)
    tokens = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == len(tokens), path
    return tokens


def _shards(folder: str, split: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(f"fineweb_{split}_"))


def _copy_shards(corpus, dst, skip_split: str | None = None) -> str:
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(corpus["path"])):
        if name.endswith(".bin") and not (skip_split and name.startswith(f"fineweb_{skip_split}_")):
            shutil.copy(os.path.join(corpus["path"], name), os.path.join(dst, name))
    return str(dst)


def _patch_header(path: str, index: int, value: int) -> None:
    header = np.fromfile(path, dtype="<i4", count=256)
    header[index] = value
    with open(path, "r+b") as f:
        f.write(header.astype("<i4").tobytes())


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------------------------
# Bad inputs


# name -> (overrides, substrings the error line must contain)
CONFIG_CASES = {
    "non_integer": ({"NUM_LAYERS": "abc"}, ["NUM_LAYERS", "abc"]),
    "non_integer_float_for_int": ({"TRAIN_SEQ_LEN": "64.5"}, ["TRAIN_SEQ_LEN", "64.5"]),
    "negative_seed": ({"SEED": "-1"}, ["SEED", "-1"]),
    "ema_decay_above_one": ({"EMA_DECAY": "2"}, ["EMA_DECAY", "2"]),
    "vocab_size_one": ({"VOCAB_SIZE": "1"}, ["VOCAB_SIZE", "1"]),
    "grad_accum_zero": ({"GRAD_ACCUM_STEPS": "0"}, ["GRAD_ACCUM_STEPS", "0"]),
    "nan_float": ({"MATRIX_LR": "nan"}, ["MATRIX_LR", "nan"]),
    "inf_float": ({"SCALAR_LR": "inf"}, ["SCALAR_LR", "inf"]),
    "bad_bool": ({"NGRAM": "maybe"}, ["NGRAM", "maybe"]),
    "device_tpu": ({"DEVICE": "tpu"}, ["DEVICE", "tpu"]),
    "odd_rope_dims": ({"ROPE_DIMS": "7"}, ["ROPE_DIMS=7"]),
    # MODEL_DIM 96 / NUM_HEADS 4: head dim 24
    "rope_dims_above_head_dim": ({"ROPE_DIMS": "32"}, ["ROPE_DIMS=32", "24"]),
    # 96 % 10 != 0 while 10 % NUM_KV_HEADS(2) == 0: only the width check can fire
    "heads_not_dividing_width": ({"NUM_HEADS": "10"}, ["NUM_HEADS=10", "MODEL_DIM=96"]),
    "kv_heads_not_dividing_heads": ({"NUM_KV_HEADS": "3"}, ["NUM_KV_HEADS=3", "NUM_HEADS=4"]),
    "xsa_more_than_layers": ({"XSA_LAST_N": "3"}, ["XSA_LAST_N=3", "NUM_LAYERS=2"]),
    "one_bigram_bucket": ({"BIGRAM_VOCAB_SIZE": "1"}, ["BIGRAM_VOCAB_SIZE=1"]),
    "mlp_width_not_whole": ({"MLP_MULT": "0.3"}, ["MLP_MULT", "0.3"]),  # 0.3 * 96 = 28.8
    "stride_above_window": ({"EVAL_STRIDE": "128"}, ["EVAL_STRIDE=128", "EVAL_SEQ_LEN=64"]),
    # 1 x 8 x 64 = 512 does not divide 1000
    "batch_not_divisible": ({"TRAIN_BATCH_TOKENS": "1000"}, ["TRAIN_BATCH_TOKENS=1000", "GRAD_ACCUM_STEPS=8"]),
    "ngram_orders_reversed": ({"NGRAM_MIN_ORDER": "5", "NGRAM_MAX_ORDER": "3"},
                              ["NGRAM_MAX_ORDER=3", "NGRAM_MIN_ORDER=5"]),
    # an n-gram score must come with its audit
    "ngram_without_audit": ({"NGRAM": "1", "NGRAM_AUDIT_POSITIONS": "0"}, ["NGRAM_AUDIT_POSITIONS=0", "NGRAM=1"]),
    "unknown_mixer": ({"NGRAM_MIXER": "adaptive"}, ["NGRAM_MIXER='adaptive'", "learned or fixed"]),
    "mix_chunk_below_first": ({"NGRAM_MIX_FIRST": "4096", "NGRAM_MIX_CHUNK": "1024"},
                              ["NGRAM_MIX_CHUNK=1024", "NGRAM_MIX_FIRST=4096"]),
    "mix_l2_zero": ({"NGRAM_MIX_L2": "0"}, ["NGRAM_MIX_L2=0", "out of range"]),
    "alpha_above_one": ({"NGRAM_ENT_BASE": "0.5", "NGRAM_ENT_RANGE": "0.6"}, ["NGRAM_ENT_BASE=0.5", "NGRAM_ENT_RANGE=0.6"]),
    "negative_ttt_lr": ({"TTT_LR": "-1e-4"}, ["TTT_LR=-1e-4", "out of range"]),
    # the records' levers (NUM_LAYERS=2 here)
    "recur_layer_out_of_range": ({"RECUR_LAYERS": "1,2"}, ["RECUR_LAYERS=1,2", "[0, 1]"]),
    "recur_layers_not_consecutive": ({"NUM_LAYERS": "4", "RECUR_LAYERS": "1,3"}, ["RECUR_LAYERS=1,3", "consecutive"]),
    "recur_layers_not_integers": ({"RECUR_LAYERS": "middle"}, ["RECUR_LAYERS='middle'", "comma-separated integers"]),
    "recur_start_frac_above_one": ({"RECUR_START_FRAC": "1.5"}, ["RECUR_START_FRAC=1.5", "out of range"]),
    "recur_start_frac_negative": ({"RECUR_START_FRAC": "-0.1"}, ["RECUR_START_FRAC=-0.1", "out of range"]),
    "recur_with_one_warmup_step": ({"WARMUP_STEPS": "1"}, ["WARMUP_STEPS=1", "RECUR_LAYERS"]),
    "negative_parallel_start": ({"PARALLEL_START_LAYER": "-1"}, ["PARALLEL_START_LAYER=-1", "out of range"]),
    "bad_row_normalize": ({"MUON_ROW_NORMALIZE": "2"}, ["MUON_ROW_NORMALIZE", "'2'"]),
}


def _data_case(name: str, corpus, d: str):
    """Build the broken input for a data case in folder d; return (overrides, expected substrings)."""
    os.makedirs(d, exist_ok=True)
    if name == "no_train_shards":
        data = _copy_shards(corpus, os.path.join(d, "data"), skip_split="train")
        return {"DATA_PATH": data}, ["fineweb_train_", data]
    if name == "no_val_shards":
        data = _copy_shards(corpus, os.path.join(d, "data"), skip_split="val")
        return {"DATA_PATH": data}, ["fineweb_val_", data]
    if name == "missing_data_path":
        data = os.path.join(d, "nowhere")
        return {"DATA_PATH": data}, ["DATA_PATH", data]
    if name in ("wrong_magic", "wrong_version", "truncated_shard", "header_only_partial", "padded_shard",
                "train_token_out_of_vocab", "val_token_out_of_vocab", "val_single_token"):
        data = _copy_shards(corpus, os.path.join(d, "data"))
        train, val = _shards(data, "train"), _shards(data, "val")
        if name == "wrong_magic":
            _patch_header(train[0], 0, 20240521)
            return {"DATA_PATH": data}, [train[0], "magic", "20240521"]
        if name == "wrong_version":
            _patch_header(val[0], 1, 2)
            return {"DATA_PATH": data}, [val[0], "version"]
        if name == "truncated_shard":
            size = os.path.getsize(train[-1])
            with open(train[-1], "r+b") as f:
                f.truncate(size - 6)  # three tokens short of what the header says
            return {"DATA_PATH": data}, [train[-1], str(size - 6)]
        if name == "header_only_partial":
            with open(train[1], "r+b") as f:
                f.truncate(100)
            return {"DATA_PATH": data}, [train[1], "100"]
        if name == "padded_shard":
            with open(val[0], "ab") as f:
                f.write(b"\0\0")
            return {"DATA_PATH": data}, [val[0]]
        if name == "train_token_out_of_vocab":
            tokens = _read_shard(train[1]).copy()
            tokens[len(tokens) // 2] = 600
            build_corpus.write_shard(train[1], tokens)
            return {"DATA_PATH": data}, [train[1], "600", f"VOCAB_SIZE={VOCAB}"]
        if name == "val_token_out_of_vocab":
            tokens = _read_shard(val[0]).copy()
            tokens[-1] = 600
            build_corpus.write_shard(val[0], tokens)
            return {"DATA_PATH": data}, [val[0], "600", f"VOCAB_SIZE={VOCAB}"]
        if name == "val_single_token":
            build_corpus.write_shard(val[0], np.array([1], dtype=np.uint16))
            return {"DATA_PATH": data}, ["DATA_PATH", data]
    if name == "tokenizer_vocab_mismatch":
        # All shard ids are < 512 < 1024, so only the tokenizer check can object.
        return {"VOCAB_SIZE": "1024"}, [corpus["tokenizer"], "512", "VOCAB_SIZE=1024"]
    if name == "missing_tokenizer":
        path = os.path.join(d, "no_such.model")
        return {"TOKENIZER_PATH": path}, ["TOKENIZER_PATH", path]
    if name == "corrupt_tokenizer":
        path = os.path.join(d, "corrupt.model")
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return {"TOKENIZER_PATH": path}, ["TOKENIZER_PATH", path]
    if name == "eval_only_missing_artifact":
        path = os.path.join(d, "missing_model.ptz")
        return {"EVAL_ONLY": "1", "ARTIFACT_PATH": path}, ["ARTIFACT_PATH", path]
    raise KeyError(name)


DATA_CASES = ["no_train_shards", "no_val_shards", "missing_data_path", "wrong_magic", "wrong_version",
              "truncated_shard", "header_only_partial", "padded_shard", "train_token_out_of_vocab",
              "val_token_out_of_vocab", "val_single_token", "tokenizer_vocab_mismatch", "missing_tokenizer",
              "corrupt_tokenizer", "eval_only_missing_artifact"]
ALL_CASES = list(CONFIG_CASES) + DATA_CASES

# Runs `python train_gpt.py` semantics in forked children of one interpreter that imported it once.
_FORK_RUNNER = r"""
import json, os, sys, traceback
sys.path.insert(0, os.path.dirname(SCRIPT))
import train_gpt
cases = json.load(open(sys.argv[1]))
codes = {}
for name, case in cases.items():
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(case["cwd"])
            os.environ.clear()
            os.environ.update(case["env"])
            out = os.open(os.path.join(case["cwd"], "stdout.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(os.path.join(case["cwd"], "stderr.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1); os.dup2(err, 2)
            try:
                code = train_gpt.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    codes[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
json.dump(codes, open(sys.argv[2], "w"))
""".replace("SCRIPT", repr(SCRIPT))


@pytest.fixture(scope="module")
def bad_runs(corpus, tmp_path_factory):
    """{case: {"rc", "stdout", "stderr", "expect", "overrides", "cwd"}} for every bad-input case."""
    base = tmp_path_factory.mktemp("bad_inputs")
    cases, meta = {}, {}
    for name in ALL_CASES:
        cwd = str(base / name)
        os.makedirs(cwd)
        if name in CONFIG_CASES:
            overrides, expect = CONFIG_CASES[name]
        else:
            overrides, expect = _data_case(name, corpus, os.path.join(cwd, "input"))
        cases[name] = {"cwd": cwd, "env": script_env(corpus, cwd, **overrides)}
        meta[name] = {"expect": expect, "overrides": overrides, "cwd": cwd}
    spec, result = base / "cases.json", base / "codes.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", _FORK_RUNNER, str(spec), str(result)], cwd=str(base),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    codes = json.loads(result.read_text())
    for name in ALL_CASES:
        cwd = meta[name]["cwd"]
        with open(os.path.join(cwd, "stdout.txt"), encoding="utf-8", errors="replace") as f:
            meta[name]["stdout"] = f.read()
        with open(os.path.join(cwd, "stderr.txt"), encoding="utf-8", errors="replace") as f:
            meta[name]["stderr"] = f.read()
        meta[name]["rc"] = codes[name]
    return meta


def _check_bad_run(rc: int, stdout: str, stderr: str, expect: list[str]) -> str:
    report = f"rc={rc}\n--- stdout ---\n{stdout[-2000:]}\n--- stderr ---\n{stderr[-3000:]}"
    assert "Traceback" not in stdout and "Traceback" not in stderr, report
    assert rc == 2, report
    errors = _error_lines(stderr)
    assert len(errors) == 1, report
    assert stderr.strip().splitlines()[-1] == errors[0], report  # the error line is the last word
    for needle in expect:
        assert needle in errors[0], f"{needle!r} missing from {errors[0]!r}"
    assert not re.search(r"^step:", stdout, re.M), report
    assert not re.search(r"^(model_params|final_)", stdout, re.M), report
    return errors[0]


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_input_exits_with_one_error_line(bad_runs, case):
    r = bad_runs[case]
    _check_bad_run(r["rc"], r["stdout"], r["stderr"], r["expect"])


@pytest.mark.parametrize("case", ["non_integer", "corrupt_tokenizer"])
def test_bad_input_real_subprocess(corpus, bad_runs, tmp_path, case):
    """The same case through a real `python train_gpt.py`: same exit code and error line as forked."""
    r = bad_runs[case]
    proc = run_script(corpus, tmp_path, **r["overrides"])
    line = _check_bad_run(proc.returncode, proc.stdout, proc.stderr, r["expect"])
    assert proc.returncode == r["rc"]
    assert line == _error_lines(r["stderr"])[0]


# ----------------------------------------------------------------------------------------------
# Byte accounting


def _script_bytes(sp, luts, ids: list[int]) -> int:
    prev = torch.tensor([1] + ids[:-1], dtype=torch.int64)
    return int(train_gpt.target_bytes(prev, torch.tensor(ids, dtype=torch.int64), luts).sum())


@pytest.fixture(scope="module")
def sp(corpus):
    return spm.SentencePieceProcessor(model_file=corpus["tokenizer"])


def test_byte_accounting_document_by_document(corpus, sp):
    luts = tuple(torch.from_numpy(a) for a in train_gpt.byte_luts(sp))
    with_byte_pieces = 0
    for i, doc in enumerate(corpus["val_docs"]):
        ids = sp.encode(doc)
        expected = len(sp.decode(ids).encode("utf-8"))
        assert _script_bytes(sp, luts, ids) == expected, (i, doc)
        with_byte_pieces += any(sp.is_byte(t) for t in ids)
    assert with_byte_pieces >= 1, "no validation document exercises byte-fallback pieces"


@pytest.mark.parametrize("doc", [
    "价格是一百元，谢谢！",                      # CJK, full-width punctuation (NFKC maps some)
    "Launch 🚀🦄 at dawn, said the crew",       # 4-byte emoji inside ASCII text
    "ﬁne ½ ™ Ω  café   déjà-vu\ttab",          # NFKC-changed characters, repeated spaces, a tab
])
def test_byte_accounting_out_of_vocabulary_text(sp, doc):
    luts = tuple(torch.from_numpy(a) for a in train_gpt.byte_luts(sp))
    ids = sp.encode(doc)
    assert any(sp.is_byte(t) for t in ids), "expected byte-fallback pieces"
    assert _script_bytes(sp, luts, ids) == len(sp.decode(ids).encode("utf-8"))


def test_byte_luts_piece_rules(sp):
    """Per-piece rules from the spec, checked against sentencepiece's own piece table."""
    base, space, boundary = train_gpt.byte_luts(sp)
    assert len(base) == sp.vocab_size() == VOCAB
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            assert base[i] == 0 and boundary[i], i
        elif sp.is_byte(i):
            assert base[i] == 1 and not space[i], i
        else:
            piece = sp.id_to_piece(i)
            assert base[i] + space[i] == len(piece.replace("\u2581", " ").encode("utf-8")), piece
    # A piece with a leading '▁': no space byte right after BOS (start of a document), one space
    # byte after an ordinary piece; both as sentencepiece's decoder sees it.
    luts = tuple(torch.from_numpy(a) for a in (base, space, boundary))
    spaced = [i for i in range(sp.vocab_size()) if space[i] and base[i] > 0]
    plain = [i for i in range(sp.vocab_size()) if base[i] > 0 and not space[i] and not sp.is_byte(i)]
    assert spaced and plain
    for p in spaced:
        after_bos = int(train_gpt.target_bytes(torch.tensor([1]), torch.tensor([p]), luts))
        assert after_bos == len(sp.decode([p]).encode("utf-8")) == base[p], sp.id_to_piece(p)
        q = plain[p % len(plain)]
        after_piece = int(train_gpt.target_bytes(torch.tensor([q]), torch.tensor([p]), luts))
        assert after_piece == len(sp.decode([q, p]).encode("utf-8")) - len(sp.decode([q]).encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Independent token and byte counts of the trained run


def test_prequant_counts_match_independent_count(corpus, sp, trained_run):
    val = np.concatenate([_read_shard(p) for p in _shards(corpus["path"], "val")])
    # The shard is the documents, each as [BOS] + ids: check the stream against the documents.
    docs = corpus["val_docs"]
    assert int((val == 1).sum()) == len(docs)
    bos = np.flatnonzero(val == 1).tolist() + [len(val)]
    for doc, a, b in zip(docs, bos[:-1], bos[1:]):
        assert val[a + 1:b].tolist() == sp.encode(doc)
    n_bytes = sum(len(sp.decode(sp.encode(doc)).encode("utf-8")) for doc in docs)
    # A whole number of training sequences would hide a truncating evaluator.
    assert (len(val) - 1) % SEQ_LEN != 0 and len(val) % SEQ_LEN != 0
    pre = trained_run["finals"]["prequant"]
    assert pre["tokens"] == len(val) - 1
    assert pre["bytes"] == n_bytes
    assert pre["coverage"] == 1.0
    for kind in ("roundtrip", "sliding", "ngram"):
        res = trained_run["finals"][kind]
        assert (res["tokens"], res["bytes"], res["coverage"]) == (len(val) - 1, n_bytes, 1.0), kind
    assert re.search(rf"^val_tokens:{len(val)}$", trained_run["stdout"], re.M)


# ----------------------------------------------------------------------------------------------
# Log


FINAL_STRICT = re.compile(r"^final_(\w+) val_loss:(\d+\.\d+) val_bpb:(\d+\.\d+) tokens:(\d+) bytes:(\d+) "
                          r"coverage:(\d+\.\d+) eval_ms:(\d+)$")
STEP_RE = re.compile(r"^step:(\d+)/(\d+) train_loss:(\d+\.\d+) lr_mult:(\d+\.\d+) step_ms:(\d+\.\d+) "
                     r"fwd_bwd_ms:(\d+\.\d+) opt_ms:(\d+\.\d+) other_ms:(-?\d+\.\d+) train_time_ms:(\d+)$")


def test_log_file_contents(trained_run):
    with open(SCRIPT, encoding="utf-8") as f:
        source = f.read()
    with open(trained_run["log"], encoding="utf-8") as f:
        log = f.read()
    assert log.startswith(source)
    rest = log[len(source):].splitlines()
    # hyperparameters, resolved
    for line in ("hparam vocab_size:512", "hparam num_layers:2", "hparam model_dim:96", "hparam train_seq_len:64",
                 "hparam train_batch_tokens:1024", "hparam grad_accum_steps:8", "hparam world_size:1",
                 "hparam iterations:10", "hparam ema_decay:0.5"):
        assert line in rest, line
    assert any(re.match(r"^model_params:\d+ ", line) for line in rest)
    assert any(line.startswith("env torch:") and "world_size:1" in line for line in rest)
    # step lines: every step logged (TRAIN_LOG_EVERY=1), schedule derivable from the settings
    steps = [STEP_RE.match(line) for line in rest if line.startswith("step:")]
    assert all(steps), [line for line in rest if line.startswith("step:")]
    iters, warmdown = int(TINY["ITERATIONS"]), int(TINY["WARMDOWN_ITERS"])
    assert [int(m.group(1)) for m in steps] == list(range(1, iters + 1))
    assert all(int(m.group(2)) == iters for m in steps)
    for m in steps:  # lr multiplier computed before step s, i.e. at 0-based step s-1
        s = int(m.group(1))
        assert float(m.group(4)) == pytest.approx(min(1.0, (iters - (s - 1)) / warmdown), abs=1e-4)
        assert math.isfinite(float(m.group(3)))
        # the breakdown: forward+backward, optimizer and everything else add up to the mean step time
        step_ms, fb, opt, other = (float(m.group(i)) for i in (5, 6, 7, 8))
        assert fb > 0 and opt > 0 and fb + opt + other == pytest.approx(step_ms, abs=0.02)
        assert int(m.group(9)) == pytest.approx(step_ms * s, abs=1 + 0.01 * s)
    # the same step lines on stdout
    assert [m.group(0) for m in steps] == [l for l in trained_run["stdout"].splitlines() if l.startswith("step:")]
    # final lines: exact format, each kind once, in order
    final_lines = [line for line in rest if line.startswith("final_")]
    matches = [FINAL_STRICT.match(line) for line in final_lines]
    assert all(matches), final_lines
    assert [m.group(1) for m in matches] == ["prequant", "roundtrip", "sliding", "ngram"]
    for m in matches:  # bpb = nats per token * tokens / (ln 2 * bytes)
        loss, bpb, tokens, nbytes = float(m.group(2)), float(m.group(3)), int(m.group(4)), int(m.group(5))
        assert bpb == pytest.approx(loss * tokens / (math.log(2) * nbytes), rel=1e-6)
        assert float(m.group(6)) == 1.0
    assert final_lines == [l for l in trained_run["stdout"].splitlines() if l.startswith("final_")]


# ----------------------------------------------------------------------------------------------
# Distributed: torchrun with gloo, 2 processes


@pytest.fixture(scope="module")
def one_process_1536(corpus, tmp_path_factory):
    """The tiny run at a batch that 1, 3 and 8 processes all split evenly (1536 tokens: 3 x 8 sequences), with
    the given knobs, run once each."""
    runs = {}

    def run(**knobs):
        key = tuple(sorted(knobs.items()))
        if key not in runs:
            proc = run_script(corpus, tmp_path_factory.mktemp("one_1536"), TRAIN_BATCH_TOKENS=1536, **knobs)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            runs[key] = proc
        return runs[key]
    return run


@pytest.mark.parametrize("nproc,accum,knobs", [(2, 4, {}), (3, 2, {"RECUR_UNTIED_MLP": 1}),
                                               (8, 1, {"RECUR_LAYERS": ""})], ids=["2", "3-untied", "8-no-repeat"])
def test_many_processes_under_the_nccl_contract_match_one_process(corpus, one_process_1536, tmp_path, nproc, accum,
                                                                  knobs):
    """The whole pipeline (train, calibrate, export, round trip, sliding + n-gram eval, audit) with 2, 3 processes
    (Muon's shape batches split unevenly, zero-padded) and 8 (the record's world size), every collective
    checked against NCCL's rules and every rank making the same ones: the run completes and scores what
    one process scores. Parallel residuals (layer 1) and the repeat (layers 0 and 1, on from step 5: the tiny
    config's); with 3 processes the repeat's MLP untied, unused until the switch (DDP looks for unused
    parameters); with 8 the record's default, no repeat."""
    proc = run_script(corpus, tmp_path, nproc=nproc, timeout=400, TRAIN_BATCH_TOKENS=1536, **knobs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.search(rf"^env .*world_size:{nproc}$", proc.stdout, re.M)
    assert re.search(rf"^hparam grad_accum_steps:{accum}$", proc.stdout, re.M)
    switch = re.findall(r"^recurrence:on step:(\d+) ", proc.stdout, re.M)  # on every rank at the same step
    assert switch == ([] if knobs.get("RECUR_LAYERS") == "" else ["5"]), switch
    calls = proc.collectives
    assert calls["all_gather_into_tensor"] >= int(TINY["ITERATIONS"]) * 3  # Muon: one gather per shape and step
    assert calls["all_reduce"] > int(TINY["ITERATIONS"]) and calls["all_gather_object"] >= 1 and calls["barrier"] == 1
    one, many = step_losses(one_process_1536(**knobs).stdout), step_losses(proc.stdout)
    assert len(one) == len(many) == int(TINY["ITERATIONS"])
    # float32 throughout on the CPU: another split of the batch changes only the summation order, so every
    # step agrees to the printed precision (a split or averaging bug moves the loss by far more)
    for step, (a, b) in enumerate(zip(one, many), 1):
        assert abs(a - b) <= 1e-4, f"step {step}: world 1 {a} vs world {nproc} {b}\n{one}\n{many}"
    f1, fn = finals(one_process_1536(**knobs).stdout), finals(proc.stdout)
    assert set(fn) == set(f1) == {"prequant", "roundtrip", "sliding", "ngram"}
    for kind in ("prequant", "roundtrip", "sliding", "ngram"):
        assert (fn[kind]["tokens"], fn[kind]["bytes"], fn[kind]["coverage"]) == \
               (f1[kind]["tokens"], f1[kind]["bytes"], 1.0), kind
        assert fn[kind]["val_bpb"] == pytest.approx(f1[kind]["val_bpb"], rel=1e-3), (kind, f1[kind], fn[kind])
    audit = re.search(r"^ngram_audit positions:(\d+) max_sum_err:\S+ max_target_err:\S+ order_mismatch:0 tol:\S+ "
                      r"sampled:(\d+)$", proc.stdout, re.M)
    assert audit and audit.group(1) == audit.group(2) != "0"


def test_two_processes_accumulate_the_same_gradients_and_step_alike(corpus, tmp_path):
    """The gradient both world sizes hand to the optimizer, compared directly: world 1 with 8
    accumulation steps against world 2 with 4 each, averaged by DDP. Muon's orthogonalization,
    AdamW's normalization and clipping would hide a wrong scale (an 8x loss moves 4-step losses by
    under 5e-5), so the comparison is made before any of them, on every parameter. Then the step
    the optimizers take: with world 2 each rank orthogonalizes half of each shape's matrices and
    all-gathers the rest, so a slice or gather bug moves some matrix by a wrong update."""
    probe = os.path.join(ROOT, "tests", "grad_probe.py")
    got = {}
    for nproc in (1, 2):
        out = tmp_path / f"grads{nproc}.pt"
        proc = subprocess.run(command(probe, nproc, str(out)), cwd=str(tmp_path), env=script_env(corpus, str(tmp_path)),
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        got[nproc] = [torch.load(f"{out}.rank{r}") for r in range(nproc)]
    assert contract_record(tmp_path, 2)["all_gather_into_tensor"] > 0  # Muon's gathers, under the NCCL contract
    (one,), (two, two_rank1) = got[1], got[2]
    assert (one["world_size"], one["accum"], two["world_size"], two["accum"]) == (1, 8, 2, 4)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert set(one["grads"]) == set(two["grads"]) and len(one["grads"]) > 20
    for name, g1 in one["grads"].items():
        g2 = two["grads"][name]
        scale = float(g1.abs().max())
        assert scale > 0, f"{name}: zero gradient, the comparison would be empty"
        assert float((g2 - g1).abs().max()) <= 1e-5 * scale, name
        assert float(g2.norm() / g1.norm()) == pytest.approx(1.0, abs=1e-5), name
        s1, s2 = one["steps"][name], two["steps"][name]
        assert float(s1.abs().max()) > 0 and torch.equal(s2, two_rank1["steps"][name]), name
        # float32 throughout on the CPU: the steps agree to 1e-4 of their size (observed <= 4e-5, the most
        # in AdamW's embedding step, whose normalization magnifies last-bit gradient differences)
        assert float((s2 - s1).abs().max()) <= 1e-4 * float(s1.abs().max()), name


# ----------------------------------------------------------------------------------------------
# Loader units


def _rt(rank: int, world: int):
    return types.SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"), upload=lambda t: t)


def _steps(paths, args, world: int, n_steps: int):
    """[(inputs, targets)] per step, each the concatenation over (rank, accumulation step)."""
    loaders = [train_gpt.BatchLoader(paths, args, _rt(r, world)) for r in range(world)]
    out = []
    for _ in range(n_steps):
        xs, ys = [], []
        for loader in loaders:  # rank-major
            for x, y in loader.next_step():  # then accumulation step
                assert x.shape == y.shape and x.shape[1] == args.train_seq_len
                xs.append(x.flatten())
                ys.append(y.flatten())
        out.append((torch.cat(xs), torch.cat(ys)))
    return out


@pytest.fixture
def counting_shards(tmp_path, request):
    """Shards whose concatenation is 0, 1, 2, ...: the stream position is the token value."""
    sizes = getattr(request, "param", (700, 500))
    paths, start = [], 0
    for i, n in enumerate(sizes):
        path = str(tmp_path / f"fineweb_train_{i:06d}.bin")
        build_corpus.write_shard(path, np.arange(start, start + n))
        paths.append(path)
        start += n
    return paths, start


def test_batch_split_does_not_change_the_data(corpus):
    paths = _shards(corpus["path"], "train")
    a = _steps(paths, tiny_args(GRAD_ACCUM_STEPS=1), world=2, n_steps=3)
    b = _steps(paths, tiny_args(GRAD_ACCUM_STEPS=2), world=1, n_steps=3)
    c = _steps(paths, tiny_args(GRAD_ACCUM_STEPS=8), world=1, n_steps=3)
    stream = _read_shard(paths[0]).astype(np.int64)
    batch = int(TINY["TRAIN_BATCH_TOKENS"])
    for k in range(3):
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
        assert torch.equal(a[k][0], c[k][0]) and torch.equal(a[k][1], c[k][1])
        assert a[k][0].tolist() == stream[k * batch:(k + 1) * batch].tolist()
        assert a[k][1].tolist() == stream[k * batch + 1:(k + 1) * batch + 1].tolist()
        if k:
            assert a[k][0][0] == a[k - 1][1][-1]  # the next step starts where the last target was


@pytest.mark.parametrize("counting_shards", [(700, 500), (257, 256, 300)], indirect=True)
@pytest.mark.parametrize("world,accum", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2), (1, 8)])
def test_batch_loader_reads_the_stream_in_order(counting_shards, world, accum):
    paths, total = counting_shards
    args = tiny_args(TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, GRAD_ACCUM_STEPS=accum)
    steps = _steps(paths, args, world, n_steps=12)  # 12 x 256 > total: wraps around at least twice
    for k, (x, y) in enumerate(steps):
        expected = (k * 256 + np.arange(257)) % total
        assert x.tolist() == expected[:-1].tolist(), k
        assert y.tolist() == expected[1:].tolist(), k
        if k:
            assert x[0] == steps[k - 1][1][-1]


def test_token_stream_wraps_and_restores(counting_shards):
    paths, total = counting_shards  # 700 + 500
    s = train_gpt.TokenStream(paths)
    assert s.take(1000).tolist() == list(range(1000))
    assert s.take(500).tolist() == list(range(1000, 1200)) + list(range(300))  # back to the first shard
    assert s.state() == (0, 300)
    saved = s.state()
    first = s.take(450)  # crosses into the second shard
    assert first.tolist() == list(range(300, 750))
    assert s.state() == (1, 50)
    s.restore(saved)  # back across the shard boundary
    assert s.state() == saved
    assert s.take(450).tolist() == first.tolist()
    saved = s.state()
    nxt = s.take(77)
    s.restore(saved)
    assert s.take(77).tolist() == nxt.tolist() == list(range(750, 827))
