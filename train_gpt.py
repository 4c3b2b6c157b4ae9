"""Parameter Golf, 10 min / 16 MB track: a 10-layer GPT (XSA, value residual, BigramHash, SmearGate, LeakyReLU^2 MLP)
trained with Muon, exported as mixed int5/int6 + zstd, scored on all of FineWeb's validation split by a sliding window
mixed with an exact, normalized, causal n-gram backoff. Every knob is an environment variable (KNOBS): README.md.
"""
import bisect
import collections
import concurrent.futures
import contextlib
import copy
import datetime
import glob
import json
import math
import os
import sys
import time
import uuid
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import zstandard
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP


# -----------------------------------------------------------------------------
# Configuration


class UsageError(Exception):
    """A bad setting, input file or artifact: reported as one `error:` line, never a traceback."""


class EvalFailure(Exception):
    """The run finished but a result must not be trusted (over the byte cap, incomplete, failed audit)."""


KIND_NAMES = {int: "an integer", float: "a number", bool: "0 or 1", list: "comma-separated integers"}
BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def env(name: str, default, kind=int, lo=None, hi=None):
    """One knob: kind int, float, bool, str, list (of integers; empty: none) or a tuple of allowed words; a value
    unparsable or outside [lo, hi] is a UsageError naming the variable, the value and what is allowed."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip() and kind is not list:
        return default
    raw = raw.strip()
    if kind is str:
        return raw
    if isinstance(kind, tuple):
        if raw not in kind:
            raise UsageError(f"{name}={raw!r} is invalid: expected {', '.join(kind[:-1])} or {kind[-1]}")
        return raw
    try:
        value = BOOLS[raw.lower()] if kind is bool else [int(x) for x in raw.split(",") if raw] if kind is list \
            else kind(raw)
    except (KeyError, ValueError):
        raise UsageError(f"{name}={raw!r} is invalid: expected {KIND_NAMES[kind]}") from None
    if kind is float and not math.isfinite(value):
        raise UsageError(f"{name}={raw!r} is invalid: expected a finite number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise UsageError(f"{name}={raw} is out of range: must be {bounds}")
    return value


# Every knob: (attribute, default, kind, lo, hi); its environment variable is the attribute in upper case.
# The model's shape (the record's: ~24.7M parameters) is stored in the artifact, so EVAL_ONLY needs no more.
# None: set from NUM_LAYERS (LAYER_DEFAULTS), so that any depth runs the record's code paths.
MODEL_KNOBS = (
    ("vocab_size", 1024, int, 2, 65536), ("num_layers", 10, int, 1), ("model_dim", 512, int, 8),
    ("num_heads", 8, int, 1), ("num_kv_heads", 4, int, 1), ("mlp_mult", 3.0, float, 0.25, 64),
    ("rope_dims", 16, int, 2), ("rope_base", 10000.0, float, 1.0), ("xsa_last_n", None, int, 0),
    ("bigram_vocab_size", 4096, int, 0), ("bigram_dim", 128, int, 1), ("smear_gate", True, bool),
    ("value_residual", True, bool), ("ln_scale", True, bool), ("logit_softcap", 30.0, float, 1.0),
    ("parallel_start_layer", None, int, 0), ("recur_layers", [], list), ("recur_untied_mlp", False, bool),
)
LAYER_DEFAULTS = {  # the records' levers (README): XSA everywhere, the last third parallel
    "xsa_last_n": lambda n: n, "parallel_start_layer": lambda n: round(2 * n / 3),
}
MODEL_KEYS = tuple(name for name, *_ in MODEL_KNOBS)
KNOBS = (
    # data, run, devices
    ("data_path", "./data/datasets/fineweb10B_sp1024", str),
    ("tokenizer_path", "./data/tokenizers/fineweb_1024_bpe.model", str),
    ("run_id", "", str), ("log_dir", "logs", str), ("seed", 1337, int, 0), ("device", "auto", ("auto", "cpu", "cuda")),
    ("compile", None, bool),  # None: on for CUDA, off for CPU
    # model
    *MODEL_KNOBS, ("qk_gain_init", 5.0, float, 0.0), ("recur_start_frac", 0.44, float, 0.0, 1.0),
    # training
    ("train_seq_len", 2048, int, 2), ("train_batch_tokens", 786_432, int, 1), ("iterations", 20_000, int, 0),
    ("max_wallclock_seconds", 600.0, float, 0.0), ("warmup_steps", 20, int, 0), ("warmdown_iters", 3500, int, 0),
    ("warmdown_frac", 0.52, float, 0.0, 1.0), ("grad_accum_steps", 0, int, 1),  # 0: 8 / world size
    ("matrix_lr", 0.03, float, 0.0), ("scalar_lr", 0.02, float, 0.0), ("tied_embed_lr", 0.03, float, 0.0),
    ("muon_wd", 0.04, float, 0.0), ("adam_wd", 0.04, float, 0.0), ("muon_momentum", 0.99, float, 0.0, 1.0),
    ("muon_momentum_warmup_start", 0.92, float, 0.0, 1.0), ("muon_momentum_warmup_steps", 1500, int, 0),
    ("muon_row_normalize", True, bool), ("grad_clip_norm", 0.3, float, 0.0), ("ema_decay", 0.997, float, 0.0, 1.0),
    ("train_log_every", 100, int, 1),
    # export
    ("artifact_path", "final_model.ptz", str), ("artifact_limit_bytes", 16_000_000, int, 1),
    ("export_gptq", True, bool), ("eval_only", False, bool),
    # evaluation
    ("eval_seq_len", 2048, int, 1), ("eval_stride", 64, int, 1), ("eval_batch_seqs", 32, int, 1),
    ("eval_budget_seconds", 600.0, float, 0.0), ("ngram", True, bool),
    ("ngram_min_order", 2, int, 2), ("ngram_max_order", 7, int, 2, 32), ("ngram_min_count", 2, int, 1),
    ("ngram_ent_base", 0.05, float, 0.0, 1.0), ("ngram_ent_range", 0.55, float, 0.0, 1.0),
    ("ngram_ent_scale", 2.0, float), ("ngram_ent_thresh", 4.0, float), ("ngram_mixer", "learned", ("learned", "fixed")),
    ("ngram_mix_first", 1024, int, 1), ("ngram_mix_chunk", 1 << 20, int, 1), ("ngram_mix_steps", 4, int, 0),
    ("ngram_mix_l2", 1e-4, float, 1e-12), ("ngram_audit_positions", 256, int, 0),
    # test-time training
    ("ttt", False, bool), ("ttt_rank", 64, int, 1), ("ttt_lr", 1e-4, float, 0.0), ("ttt_wd", 0.5, float, 0.0),
    ("ttt_chunk", 32, int, 1), ("ttt_docs", 32, int, 1), ("ttt_reserve_seconds", 60.0, float, 0.0),
    # submission
    ("submission_path", "submission.json", str), ("author", "", str), ("github_id", "", str),
)


class Hyperparameters:
    """Every knob, read from the environment and validated before any expensive work."""

    def __init__(self, world_size: int = 1):
        for name, default, *rule in KNOBS:
            setattr(self, name, env(name.upper(), default, *rule))
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        self.grad_accum_steps = self.grad_accum_steps or max(1, 8 // world_size)
        self.world_size = world_size
        for name, default in LAYER_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default(self.num_layers))
        if self.eval_only:  # the artifact carries the model's shape: adopt it before checking shapes
            self.apply_model_config(read_artifact(self.artifact_path)[0]["config"])
        self.check()

    def check(self) -> None:
        head_dim, width, recur = self.model_dim // self.num_heads, self.mlp_mult * self.model_dim, self.recur_layers
        micro = self.world_size * self.grad_accum_steps * self.train_seq_len

        def knob(name: str) -> str:
            return f"{name.upper()}={getattr(self, name)}"
        rules = (  # (broken, message): the first broken one is reported
            *((getattr(self, b) % getattr(self, a), f"{knob(a)} must divide {knob(b)}")
              for a, b in (("num_heads", "model_dim"), ("num_kv_heads", "num_heads"))),
            *((getattr(self, a) > getattr(self, b), f"{knob(a)} is invalid: must be <= {knob(b)}") for a, b in (
                ("xsa_last_n", "num_layers"), ("ngram_min_order", "ngram_max_order"),
                ("ngram_mix_first", "ngram_mix_chunk"), ("eval_stride", "eval_seq_len"))),
            (self.rope_dims % 2 or self.rope_dims > head_dim,
             f"ROPE_DIMS={self.rope_dims} is invalid: must be even and <= head dim {head_dim}"),
            (recur and recur != list(range(recur[0], recur[0] + len(recur)))
             or not {*recur} <= {*range(self.num_layers)},
             f"RECUR_LAYERS={','.join(map(str, recur))} is invalid: must be consecutive ascending layers in "
             f"[0, {self.num_layers - 1}] (empty: off)"),
            (recur and self.warmup_steps == 1 and not self.eval_only,
             "WARMUP_STEPS=1 is invalid with RECUR_LAYERS: both graphs need a warm-up step (use 0 or >= 2)"),
            (self.bigram_vocab_size == 1,
             "BIGRAM_VOCAB_SIZE=1 is invalid: use 0 (off) or >= 2 (one bucket is reserved)"),
            (abs(width - round(width)) > 1e-9,
             f"MLP_MULT={self.mlp_mult} is invalid: MLP_MULT*MODEL_DIM must be a whole number"),
            (self.ngram_ent_base + self.ngram_ent_range > 1, f"NGRAM_ENT_BASE={self.ngram_ent_base} + "
             f"NGRAM_ENT_RANGE={self.ngram_ent_range} must be <= 1: alpha is a mixing weight"),
            (self.ngram and not self.ngram_audit_positions, "NGRAM_AUDIT_POSITIONS=0 is invalid with NGRAM=1: an "
             "n-gram score is only reported after its audit (use >= 1, or NGRAM=0)"),
            (not self.eval_only and self.train_batch_tokens % micro,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of world size {self.world_size} x "
             f"GRAD_ACCUM_STEPS={self.grad_accum_steps} x TRAIN_SEQ_LEN={self.train_seq_len}"),
        )
        for broken, message in rules:
            if broken:
                raise UsageError(message)

    def model_config(self, layer_order: list[int] | None = None) -> dict:
        """The shape, and the order the layers ran in (GPT.layer_order)."""
        return {**{k: getattr(self, k) for k in MODEL_KEYS}, "layer_order": layer_order or list(range(self.num_layers))}

    def apply_model_config(self, config: dict) -> None:
        """Adopt an artifact's shape; an env var that says otherwise is an error, not a silent override."""
        for key in MODEL_KEYS:
            if type(config.get(key)) is not type(getattr(self, key)):  # missing: None
                raise UsageError(f"artifact {self.artifact_path} is corrupt: its {key} is {config.get(key)!r}")
            if key.upper() in os.environ and getattr(self, key) != config[key]:
                raise UsageError(f"{key.upper()}={getattr(self, key)} contradicts the artifact's {config[key]}")
            setattr(self, key, config[key])


# -----------------------------------------------------------------------------
# Runtime: processes, devices, logging


class Runtime:
    """Rank, device and precision: CPU and CUDA differ only here."""

    def __init__(self, device_pref: str = "auto"):
        self.rank, self.world_size, self.local_rank = (
            int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
        self.is_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        if self.is_cuda and not torch.cuda.is_available():
            raise UsageError("DEVICE=cuda but no CUDA device is available")
        self.device = torch.device("cuda", self.local_rank) if self.is_cuda else torch.device("cpu")
        self.master = self.rank == 0
        if self.is_cuda:  # cuBLAS reads this when it starts: deterministic() needs a fixed workspace
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.is_cuda else "gloo", device_id=self.device if self.is_cuda else None)

    def autocast(self):
        return torch.autocast("cuda", torch.bfloat16) if self.is_cuda else contextlib.nullcontext()

    def sync(self):
        if self.is_cuda:
            torch.cuda.synchronize()

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, on every rank."""
        out = [obj] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(out, obj)
        return out

    def upload(self, t: Tensor) -> Tensor:
        """A host tensor on the device without making the host wait: pinned, then copied asynchronously."""
        return t.pin_memory().to(self.device, non_blocking=True) if self.is_cuda else t


class Logger:
    """Rank 0 writes to stdout and logs/<RUN_ID>.txt; other ranks stay quiet."""

    def __init__(self, args: Hyperparameters, rt: Runtime):
        self.path = os.path.join(args.log_dir, f"{args.run_id}.txt") if rt.master else None
        if self.path:
            os.makedirs(args.log_dir, exist_ok=True)
            open(self.path, "w", encoding="utf-8").close()

    def __call__(self, msg: str = "", console: bool = True) -> None:
        if self.path:
            if console:
                print(msg, flush=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


# -----------------------------------------------------------------------------
# Data: shards, tokenizer, byte accounting

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 1024  # header: 256 int32, of which 3 are used
BOS_ID = 1  # every document starts with it


def shard_tokens(path: str) -> np.ndarray:
    """A shard's tokens, mapped from disk once its header and its exact size are checked."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise UsageError(f"shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, count = np.fromfile(path, dtype="<i4", count=3).tolist()
    if magic != SHARD_MAGIC:
        raise UsageError(f"shard {path} has wrong magic {magic} (expected {SHARD_MAGIC})")
    if version != SHARD_VERSION:
        raise UsageError(f"shard {path} has unsupported version {version} (expected {SHARD_VERSION})")
    if count < 0 or size != HEADER_BYTES + 2 * count:
        raise UsageError(f"shard {path} is truncated or padded: {size} bytes, header says {count} tokens "
                         f"({HEADER_BYTES + 2 * count} bytes)")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def find_shards(data_path: str, split: str) -> list[str]:
    paths = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not paths:
        raise UsageError(f"no fineweb_{split}_*.bin shards under DATA_PATH={data_path}")
    return paths


def validate_shards(paths: list[str], vocab_size: int, rt: Runtime) -> None:
    """Headers everywhere; the token-id scan of every shard is shared out across ranks."""
    counts = [len(shard_tokens(p)) for p in paths]
    maxima = torch.zeros(len(paths), dtype=torch.int64, device=rt.device)
    for i in range(rt.rank, len(paths), rt.world_size):
        if counts[i]:
            maxima[i] = int(shard_tokens(paths[i]).max())
    for path, top in zip(paths, rt.all_reduce(maxima, dist.ReduceOp.MAX).tolist()):
        if top >= vocab_size:
            raise UsageError(f"shard {path} holds token id {top} >= VOCAB_SIZE={vocab_size}")


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise UsageError(f"TOKENIZER_PATH={path} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except Exception:
        raise UsageError(f"TOKENIZER_PATH={path} is not a SentencePiece model") from None
    if sp.vocab_size() != vocab_size:
        raise UsageError(f"tokenizer {path} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    return sp


def byte_luts(sp: spm.SentencePieceProcessor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per piece: bytes of its text without a leading '▁', whether it has one, and whether it is a
    control/unknown/unused piece (after which a '▁' stands for no byte)."""
    n = sp.vocab_size()
    base, space, boundary = np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            space[i] = piece.startswith("\u2581")
            base[i] = len(piece.removeprefix("\u2581").encode("utf-8"))
    return base, space, boundary


def target_bytes(prev: Tensor, tgt: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    base, space, boundary = luts
    return base[tgt] + (space[tgt] & ~boundary[prev]).to(torch.int64)


class TokenStream:
    """The train shards as one endless stream, read in sorted order; its position can be saved."""

    def __init__(self, paths: list[str]):
        self.paths, self.shard, self.pos = paths, 0, 0
        self.tokens = shard_tokens(paths[0])

    def state(self) -> tuple[int, int]:
        return self.shard, self.pos

    def restore(self, state: tuple[int, int]) -> None:
        if state[0] != self.shard:
            self.tokens = shard_tokens(self.paths[state[0]])
        self.shard, self.pos = state

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):  # on to the next shard (an empty one yields nothing)
                self.restore(((self.shard + 1) % len(self.paths), 0))
            parts.append(self.tokens[self.pos:self.pos + n])
            self.pos += len(parts[-1])
            n -= len(parts[-1])
        return np.concatenate(parts).astype(np.int64)


class BatchLoader:
    """Each step reads TRAIN_BATCH_TOKENS + 1 contiguous tokens (steps overlap by one target); micro-batch i
    (rank-major, then accumulation step) gets slice i, so the data does not depend on how the batch is split.
    prefetch() reads the next step while the device runs this one."""

    def __init__(self, paths: list[str], args: Hyperparameters, rt: Runtime):
        self.stream, self.rt, self.ahead = TokenStream(paths), rt, None
        self.batch, self.seq_len, self.accum = args.train_batch_tokens, args.train_seq_len, args.grad_accum_steps
        self.micro = self.batch // (rt.world_size * self.accum)

    def _read(self) -> list[tuple[Tensor, Tensor]]:
        chunk = self.stream.take(self.batch + 1)
        self.stream.pos -= 1  # the last target is the next step's first input
        per_rank = self.accum * self.micro
        mine = self.rt.upload(torch.from_numpy(chunk[self.rt.rank * per_rank:][:per_rank + 1]))
        pieces = [mine[k * self.micro:(k + 1) * self.micro + 1] for k in range(self.accum)]
        return [(piece[:-1].view(-1, self.seq_len), piece[1:].view(-1, self.seq_len)) for piece in pieces]

    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        batch, self.ahead = self.ahead or self._read(), None
        return batch

    def prefetch(self) -> None:
        self.ahead = self._read()


def load_validation(args: Hyperparameters, rt: Runtime) -> Tensor:
    tokens = np.concatenate([shard_tokens(p) for p in find_shards(args.data_path, "val")])
    if len(tokens) < 2:
        raise UsageError(f"the validation shards under DATA_PATH={args.data_path} hold fewer than 2 tokens")
    return torch.from_numpy(tokens.astype(np.int64)).to(rt.device)  # resident once for every eval pass


# -----------------------------------------------------------------------------
# Model


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of the first 2 x cos.size(-1) head dims of x [B, H, T, head_dim] (partial RoPE)."""
    d, cos, sin = cos.size(-1), cos.to(x.dtype), sin.to(x.dtype)
    x1, x2, rest = x[..., :d], x[..., d:2 * d], x[..., 2 * d:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: Hyperparameters, xsa: bool):
        super().__init__()
        dim, self.heads, self.kv_heads = args.model_dim, args.num_heads, args.num_kv_heads
        self.head_dim = dim // self.heads
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k, self.c_v = (nn.Linear(dim, self.kv_heads * self.head_dim, bias=False) for _ in range(2))
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj.zero_init = True
        dims = torch.arange(0, args.rope_dims, 2, dtype=torch.float32)
        self.register_buffer("inv_freq", args.rope_base ** (-dims / args.rope_dims), persistent=False)
        self.xsa = xsa

    def forward(self, x: Tensor, v0: Tensor | None, vr_lambda: Tensor | None, q_gain: Tensor) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = (c(x).view(B, T, -1, self.head_dim).transpose(1, 2) for c in (self.c_q, self.c_k, self.c_v))
        if vr_lambda is not None:  # value residual: mix in layer 0's values
            v = vr_lambda[0] * v0 + vr_lambda[1] * v
        freqs = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        q = rotary(rms_norm(q), cos, sin) * q_gain.to(q.dtype)[None, :, None, None]
        k = rotary(rms_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        if self.xsa:  # remove from each head's output its component along the token's own value
            y = y.unflatten(1, (self.kv_heads, self.heads // self.kv_heads))  # query heads by KV group
            v_hat = F.normalize(v, dim=-1).unsqueeze(2)
            y = (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).flatten(1, 2)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1)), v


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.proj.zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), 0.5).square())


class Block(nn.Module):
    """Attention and MLP matrices, shared by the passes (2 in a RECUR_LAYERS layer), and each pass's own scalars and
    norm scale. From PARALLEL_START_LAYER on, attention and MLP both read the block's input (GPT-J)."""

    def __init__(self, args: Hyperparameters, layer: int):
        super().__init__()
        dim, recur = args.model_dim, args.recur_layers
        passes = 1 + (layer in recur)
        self.attn = Attention(args, xsa=layer >= args.num_layers - args.xsa_last_n)
        self.mlp = MLP(dim, round(args.mlp_mult * dim))
        self.repeat = nn.ModuleDict({"mlp": MLP(dim, self.mlp.fc.out_features)}) if (
            passes > 1 and args.recur_untied_mlp) else None
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(passes, dim), torch.zeros(passes, dim)), dim=1))
        self.attn_scale, self.mlp_scale = (nn.Parameter(torch.ones(passes, dim)) for _ in range(2))
        self.q_gain = nn.Parameter(torch.full((passes, args.num_heads), args.qk_gain_init))
        # value residual: layers >= 1 (and their repeats) mix in layer 0's values
        self.vr_lambda = nn.Parameter(torch.full((passes, 2), 0.5)) if args.value_residual and layer else None
        # a pass's depth: its layer's, or a repeat's place in the order that runs
        depth = (layer, layer + len(recur))[:passes]
        self.norm_scale = [1.0 / math.sqrt(d + 1) if args.ln_scale else 1.0 for d in depth]
        self.parallel = layer >= args.parallel_start_layer

    def forward(self, x, x0, v0, p: int):
        x = self.resid_mix[p, 0] * x + self.resid_mix[p, 1] * x0
        s, vr = self.norm_scale[p], None if self.vr_lambda is None else self.vr_lambda[p]
        a, v = self.attn(rms_norm(x) * s, v0, vr, self.q_gain[p])
        y = x + self.attn_scale[p] * a
        mlp = self.mlp if p == 0 or self.repeat is None else self.repeat["mlp"]
        return y + self.mlp_scale[p] * mlp(rms_norm(x if self.parallel else y) * s), v


class BigramHash(nn.Module):
    """(previous token, token) hashed into buckets 0..B-2; bucket B-1 is the first position's, with no previous."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.emb = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.emb.weight)
        self.proj = nn.Linear(dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.bitwise_xor(idx[:, :-1] * 36313, idx[:, 1:] * 27191) % (self.buckets - 1)
        h = torch.cat((torch.full_like(idx[:, :1], self.buckets - 1), h), dim=1)
        return self.scale * self.proj(self.emb(h))


class SmearGate(nn.Module):
    """x_t <- (1-g) x_t + g x_{t-1}; g = 0 at a BOS and at the first position: nothing leaks across documents."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        g = torch.sigmoid(self.w).to(x.dtype) * (idx[:, 1:] != BOS_ID).unsqueeze(-1).to(x.dtype)
        return torch.cat((x[:, :1], (1 - g) * x[:, 1:] + g * x[:, :-1]), dim=1)


class GPT(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim, n = args.model_dim, args.num_layers
        self.softcap = args.logit_softcap
        self.tok_emb = nn.Embedding(args.vocab_size, dim)
        self.bigram = BigramHash(args.bigram_vocab_size, args.bigram_dim, dim) if args.bigram_vocab_size else None
        self.smear = SmearGate(dim) if args.smear_gate else None
        self.blocks = nn.ModuleList(Block(args, i) for i in range(n))
        self.n_enc = n // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, n - self.n_enc), dim))
        # (layer, pass) in the order they run: with the repeat on, the RECUR_LAYERS again after the last of them
        first, r = [(i, 0) for i in range(n)], args.recur_layers
        self.orders = {False: first, True: first[:r[-1] + 1] + [(i, 1) for i in r] + first[r[-1] + 1:] if r else first}
        self.recur_on = False  # switched on once in training: two graphs, both compiled in warm-up
        nn.init.normal_(self.tok_emb.weight, std=0.005)
        for m in self.modules():  # matrices orthogonal, the output projections zero: every block starts as the identity
            if isinstance(m, nn.Linear) and getattr(m, "zero_init", False):
                nn.init.zeros_(m.weight)
            elif isinstance(m, nn.Linear) and min(m.weight.shape) >= 64:
                nn.init.orthogonal_(m.weight)

    def hidden(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, idx)
        x0, v0, skips = x, None, []
        for i, p in self.orders[self.recur_on]:  # U-Net skips by layer: a repeat neither pushes nor pops
            if i >= self.n_enc and skips and not p:
                x = x + self.skip_weights[i - self.n_enc] * skips.pop()
            x, v = self.blocks[i](x, x0, v0, p)
            v0 = v if v0 is None else v0
            if i < self.n_enc and not p:
                skips.append(x)
        return rms_norm(x)

    def layer_order(self, recur_on: bool | None = None) -> list[int]:
        return [i for i, _ in self.orders[self.recur_on if recur_on is None else recur_on]]

    def logits(self, h: Tensor, dtype: torch.dtype = torch.float32, delta: Tensor | None = None) -> Tensor:
        """float64 for the eval (eval_logprobs); `delta`: a TTT adapter's share of the head."""
        z = F.linear(h.to(dtype), self.tok_emb.weight.to(dtype)).to(dtype)
        z = z if delta is None else z + delta.to(dtype)
        return self.softcap * torch.tanh(z / self.softcap)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        logits = self.logits(self.hidden(idx))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


# -----------------------------------------------------------------------------
# Optimizers


def param_groups(model: GPT) -> dict[str, list[nn.Parameter]]:
    groups = {"muon": [], "embed": [], "scalar": []}
    for m in model.modules():
        kind = "muon" if isinstance(m, nn.Linear) else "embed" if isinstance(m, nn.Embedding) else "scalar"
        groups[kind] += m.parameters(recurse=False)
    return groups


def newton_schulz(g: Tensor, dtype: torch.dtype) -> Tensor:
    """torch.optim.Muon's quintic iteration on a batch [n, rows, cols]: one batched product per term."""
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update, one batch per shape: each rank orthogonalizes an equal slice of it and
    all-gathers the rest while the next shape computes. row_normalize (MuonEq-R): the Nesterov update's rows at
    unit norm before Newton-Schulz. Matrices without a gradient (an untied repeat before the switch) are left."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, row_normalize: bool = False):
        super().__init__(list(params), {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.row_normalize = row_normalize
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        cuda = self.param_groups[0]["params"][0].is_cuda
        self.ns = torch.compile(newton_schulz, dynamic=False) if cuda else newton_schulz
        self.ns_dtype = torch.bfloat16 if cuda else torch.float32  # a CPU often emulates bf16 products (~60x slower)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, wd, mom, shapes, gathers = group["lr"], group["weight_decay"], group["momentum"], {}, []
            for p in (p for p in group["params"] if p.grad is not None):
                shapes.setdefault(p.shape, []).append(p)
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            for params in shapes.values():
                grads, bufs = [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - mom)
                per = -(-len(params) // self.world)
                x = torch.zeros(per, *params[0].shape, device=params[0].device)  # this rank's slice, zero-padded
                for j, i in enumerate(range(self.rank * per, min(len(params), (self.rank + 1) * per))):
                    x[j] = grads[i].lerp(bufs[i], mom)
                if self.row_normalize:
                    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-7)
                x = self.ns(x, self.ns_dtype).contiguous()  # NCCL gathers dense tensors only (tall ones come as .mT)
                out = x if self.world == 1 else x.new_empty(per * self.world, *x.shape[1:])
                handle = dist.all_gather_into_tensor(out, x, async_op=True) if self.world > 1 else None
                gathers.append((params, out, handle))
            for params, out, handle in gathers:
                if handle is not None:
                    handle.wait()
                torch._foreach_mul_(params, 1 - lr * wd)
                scale = -lr * math.sqrt(max(1, params[0].size(0) / params[0].size(1)))
                torch._foreach_add_(params, list(out[:len(params)].float().unbind(0)), alpha=scale)


def build_optimizers(model: GPT, args: Hyperparameters) -> list[torch.optim.Optimizer]:
    g = param_groups(model)
    muon = Muon(g["muon"], lr=args.matrix_lr, weight_decay=args.muon_wd, momentum=args.muon_momentum_warmup_start,
                row_normalize=args.muon_row_normalize)
    adam = torch.optim.AdamW([{"params": g["embed"], "lr": args.tied_embed_lr, "weight_decay": args.adam_wd},
                              {"params": g["scalar"], "lr": args.scalar_lr, "weight_decay": 0.0}],
                             betas=(0.9, 0.95), eps=1e-8, fused=g["embed"][0].is_cuda)
    for group in muon.param_groups + adam.param_groups:
        group["base_lr"] = group["lr"]
    return [muon, adam]


def lr_multiplier(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """The lower of two warmdowns: by the wall clock (the same share of the run on any card) and by ITERATIONS."""
    mult = (args.iterations - step) / args.warmdown_iters if args.warmdown_iters else 1.0
    if args.max_wallclock_seconds > 0 and args.warmdown_frac > 0:
        budget_ms = 1000 * args.max_wallclock_seconds
        mult = min(mult, (budget_ms - elapsed_ms) / (args.warmdown_frac * budget_ms))
    return min(1.0, max(0.0, mult))


# -----------------------------------------------------------------------------
# Training


class Timeline:
    """Marks on the device's timeline (CUDA events; on a CPU, where work ends with its call, the host clock): the
    stop rule measures steps without waiting for them."""

    def __init__(self, cuda: bool):
        self.cuda, self.start, self.done_ms, self.phases = cuda, None, 0.0, [0.0, 0.0]  # forward+backward, optimizer
        self.recent = collections.deque(maxlen=16)  # the last steps' times (ms)

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)

    def done(self, mark) -> bool:
        return mark.query() if self.cuda else True

    def wait(self, mark) -> None:
        if self.cuda:
            mark.synchronize()

    def finished(self, marks: list) -> float:
        """Records the time of a step (waiting for its last mark); returns the device time since `start` (ms)."""
        self.wait(marks[-1])
        now_ms = self.ms(self.start, marks[-1])
        self.recent.append(now_ms - self.done_ms)
        self.done_ms = now_ms
        self.phases = [total + self.ms(a, b) for total, a, b in zip(self.phases, marks, marks[1:])]
        return now_ms

    def reserve(self, marks: list, previous: list | None, calib_ms: float) -> tuple[float, int, float]:
        """(ms, steps, slowest) still to run were the next step flagged instead: the unfinished steps, the next
        (launched before a flag is read) and one more, each at the slowest of the last 16, then the calibration."""
        steps = 2 + sum(not self.done(m[-1]) for m in (marks, previous) if m is not None)
        slowest = max(self.recent, default=0.0)
        return steps * slowest + calib_ms, steps, slowest


class Trainer:
    def __init__(self, args: Hyperparameters, rt: Runtime, model: GPT, loader: BatchLoader, log: Logger):
        self.args, self.rt, self.model, self.loader, self.log = args, rt, model, loader, log
        self.optimizers, self.params = build_optimizers(model, args), list(model.parameters())
        use_compile = rt.is_cuda if args.compile is None else args.compile
        fwd = torch.compile(model, fullgraph=True) if use_compile else model
        self.fwd = (DDP(fwd, device_ids=[rt.local_rank] if rt.is_cuda else None, broadcast_buffers=False,
                        find_unused_parameters=args.recur_untied_mlp) if rt.world_size > 1 else fwd)  # unused until on
        if rt.world_size > 1:  # DDP times its first 10 steps (the warm-up's), waiting for the device, then never
            self.fwd._set_ddp_runtime_logging_sample_rate(1 << 30)
        self.clock, self.budget_ms, self.calib_ms = Timeline(rt.is_cuda), 1000 * args.max_wallclock_seconds, 0.0
        # stop flags are device constants; flags reach the host in two pinned buffers, used in turn: nothing blocks
        self.late_flags = torch.tensor([0.0, 1.0], device=rt.device)
        self.host_flags = [torch.empty(2, pin_memory=True) for _ in range(2)] if rt.is_cuda else None

    def accumulate(self, micro_batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """The gradient of the mean loss over the whole step (DDP averages ranks); returns this rank's mean loss."""
        total = torch.zeros((), device=self.rt.device)
        for k, (x, y) in enumerate(micro_batches):
            sync = k == len(micro_batches) - 1 or self.rt.world_size == 1
            with (contextlib.nullcontext() if sync else self.fwd.no_sync()), self.rt.autocast():
                loss = self.fwd(x, y)
            (loss / len(micro_batches)).backward()
            total += loss.detach()
        return total / len(micro_batches)

    def step(self, step: int, lr_mult: float) -> tuple[Tensor, list]:
        """This rank's mean loss, and marks before forward+backward, before the optimizer and after it."""
        args = self.args
        frac = min(1.0, step / args.muon_momentum_warmup_steps) if args.muon_momentum_warmup_steps else 1.0
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mult
                if isinstance(opt, Muon):
                    group["momentum"] = (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum
        micro_batches = self.loader.next_step()
        marks = [self.clock.mark()]
        loss = self.accumulate(micro_batches)
        marks.append(self.clock.mark())
        if args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, args.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        marks.append(self.clock.mark())
        self.loader.prefetch()  # the host reads the next batch while the device works on this one
        return loss, marks

    def warmup(self) -> None:
        """Compile and warm up on real steps (the second half with the repeat on: both graphs compiled), time the
        export's calibration (for the stop rule), then undo it all."""
        W, recur = self.args.warmup_steps, bool(self.args.recur_layers)
        if not W and not self.budget_ms:
            return
        saved = [(obj, copy.deepcopy(obj.state_dict())) for obj in (self.model, *self.optimizers)]
        stream, t0 = self.loader.stream.state(), time.perf_counter()
        for i in range(W):
            self.model.recur_on = recur and i >= W // 2
            self.step(i, 1.0)
        self.rt.sync()
        warm_ms, t0 = 1000 * (time.perf_counter() - t0), time.perf_counter()
        if self.budget_ms:  # as at the end of training: with the repeat
            self.model.recur_on = recur
            calibrate(self.model, self.loader.next_step(), self.rt, math.inf)
            self.calib_ms = 1000 * (time.perf_counter() - t0)
        for obj, state in saved:
            obj.load_state_dict(state)
        self.model.recur_on = False
        self.loader.stream.restore(stream)
        self.loader.ahead = None
        self.log(f"warmup_steps:{W} warmup_ms:{warm_ms:.0f} calibration_ms:{self.calib_ms:.0f} (undone)")

    def train(self) -> dict:
        """The steps, then the EMA weights, calibrated on the next training batch inside the budget."""
        self.rt.sync()
        self.t0, self.clock.start = time.perf_counter(), self.clock.mark()
        ema, steps = self.run_steps()
        with torch.no_grad():
            torch._foreach_copy_(self.params, ema)
        calib = calibrate(self.model, self.loader.next_step(), self.rt,
                          self.t0 + self.budget_ms / 1000 if self.budget_ms else math.inf)
        total_ms = 1000 * (time.perf_counter() - self.t0)
        self.log(f"calibration tokens:{calib['tokens']} ms:{total_ms - self.clock.done_ms:.0f} "
                 f"reserved_ms:{self.calib_ms:.0f} train_total_ms:{total_ms:.0f}")
        if self.rt.is_cuda:
            self.log(f"peak_memory_mib:{torch.cuda.max_memory_allocated() / 2**20:.0f}")
        return {"steps": steps, "train_seconds": total_ms / 1000, "calib": calib}

    def run_steps(self) -> tuple[list[Tensor], int]:
        """(EMA weights, steps). A step's loss and stop flag are read a step later, with no host synchronization:
        the device always has the next step queued."""
        args, ema = self.args, [p.detach().float().clone() for p in self.params]
        step, stop, pending = 0, False, None
        while True:
            launched = None
            if step < args.iterations and not stop:
                share = max(step / args.iterations, self.clock.done_ms / self.budget_ms if self.budget_ms else 0.0)
                if args.recur_layers and not self.model.recur_on and share >= args.recur_start_frac:
                    self.model.recur_on = True  # the stop rule's spare step covers the slower steps in flight (README)
                    self.log(f"recurrence:on step:{step} train_time_ms:{self.clock.done_ms:.0f}")
                mult = lr_multiplier(args, step, self.clock.done_ms)
                local_loss, marks = self.step(step, mult)
                decay = min(args.ema_decay, (1 + step) / (10 + step))  # warms up: no init weights in short runs
                torch._foreach_lerp_(ema, [p.detach().float() for p in self.params], 1 - decay)
                step += 1
                reserve = self.clock.reserve(marks, pending and pending[3], self.calib_ms)
                late = self.budget_ms > 0 and 1000 * (time.perf_counter() - self.t0) + reserve[0] > self.budget_ms
                flags = self.rt.all_reduce(torch.stack((local_loss, self.late_flags[int(late)])))  # one collective
                host = flags if self.host_flags is None else self.host_flags[step % 2].copy_(flags, non_blocking=True)
                marks.append(self.clock.mark())  # once this has passed, `host` holds the loss and every rank's flag
                launched = (step, mult, host, marks, reserve)
            if pending is not None and self.finish(*pending[:4]) and not stop:
                stop = True
                _, steps_left, slowest = pending[4]
                self.log(f"stopping_early: step {pending[0]} flagged that {steps_left} more steps at {slowest:.0f} ms "
                         f"and the calibration ({self.calib_ms:.0f} ms) would end past "
                         f"MAX_WALLCLOCK_SECONDS={args.max_wallclock_seconds:g}")
            if launched is None:
                return ema, step
            pending = launched

    def finish(self, step: int, mult: float, host: Tensor, marks: list) -> bool:
        now_ms = self.clock.finished(marks)
        loss, stop = host.tolist()
        if step % self.args.train_log_every == 0 or step == 1 or stop or step == self.args.iterations:
            (fb, opt), step_ms = (x / step for x in self.clock.phases), now_ms / step
            self.log(f"step:{step}/{self.args.iterations} train_loss:{loss / self.rt.world_size:.4f} "
                     f"lr_mult:{mult:.4f} step_ms:{step_ms:.2f} fwd_bwd_ms:{fb:.2f} opt_ms:{opt:.2f} "
                     f"other_ms:{step_ms - fb - opt:.2f} train_time_ms:{now_ms:.0f}")
        return stop > 0


# -----------------------------------------------------------------------------
# Export: a budget-fit mixed int5/int6 quantization, deterministic serialization, zstd-22

ARTIFACT_FORMAT = "pgolf-mixed-int-v6"
ARTIFACT_ERRORS = (zstandard.ZstdError, ValueError, KeyError, TypeError, AttributeError)
CLIP_RATIOS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8, 0.75)
FP16_ROWS = ("tok_emb.weight",)  # rows may stay fp16: the tied embedding, also the output head
QMAX_LADDER = (15, 31, 63, 127)  # int5, int6, int7, int8
MAGNITUDE_RADICES = {"mag2": (16, 16), "mag3": (7, 6, 6)}  # a byte holds 2 or 3 magnitudes, each capped below its radix
ZSTD_EXPORT = zstandard.ZstdCompressionParameters.from_level(22, min_match=7)
# the fit's estimate: the same literal coder ~10x faster, its match finder kept from chance repeats level 22 declines
ZSTD_SIZING = zstandard.ZstdCompressionParameters.from_level(1, hash_log=6, min_match=7)
FIT_MARGIN = 0.0025  # aim this far under the limit; accept up to twice as far


def quant_levels(name: str, t: Tensor) -> int:
    """The coarsest range a tensor may take, as its qmax; 0: vectors and small matrices stay fp16."""
    return 0 if t.ndim != 2 or t.numel() <= 8192 else 15 if ".mlp." in name else 31


def fp16_scale(scale: Tensor) -> Tensor:
    return scale.clamp(2.0 ** -24, 65504.0).half().float()


def finest_steps(w: Tensor, qmax: int) -> Tensor:
    """Each row's finest step in ±qmax: the clip ratio of least squared error, rounded to fp16 as stored."""
    w = w.float()
    row_max, best_s, best_err = w.abs().amax(dim=1), None, math.inf
    for ratio in CLIP_RATIOS:
        scale = fp16_scale(row_max * ratio / qmax)
        err = (torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax) * scale[:, None] - w).square().sum(dim=1)
        best_s = scale if best_s is None else torch.where(err < best_err, scale, best_s)
        best_err = torch.minimum(err, torch.as_tensor(best_err))
    return best_s


def calibrate(model: GPT, micro_batches, rt: Runtime, deadline: float) -> dict:
    """Per quantized matrix: each row's squared gradient under labels sampled from the model (`fisher`, the
    curvature its rounding meets), and a linear layer's input Gram matrix (`gram`, for GPTQ)."""
    def add_gram(module, inputs):
        x = inputs[0].detach().flatten(0, -2).float()
        grams[module].addmm_(x.T, x)

    stats, grams, params = {}, {}, dict(model.named_parameters())
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and quant_levels(name + ".weight", mod.weight):
            st = stats[name + ".weight"] = {"fisher": torch.zeros(mod.weight.shape[0], device=rt.device)}
            if isinstance(mod, nn.Linear):
                st["gram"] = grams[mod] = torch.zeros(mod.in_features, mod.in_features, device=rt.device)
    hooks, count = [mod.register_forward_pre_hook(add_gram) for mod in grams], torch.zeros((), device=rt.device)
    try:
        for x, _ in micro_batches:
            t0 = time.perf_counter()
            with rt.autocast():
                logits = model.logits(model.hidden(x)).flatten(0, 1)
            sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(1)
            F.cross_entropy(logits, sampled).backward()
            for name, st in stats.items():
                st["fisher"] += params[name].grad.float().square().sum(1)
            model.zero_grad(set_to_none=True)
            count += x.numel()
            rt.sync()
            if time.perf_counter() + (time.perf_counter() - t0) > deadline:  # the next would end past it
                break
    finally:
        for h in hooks:
            h.remove()
    return {"tokens": int(rt.all_reduce(count).item()),
            "tensors": {name: {k: rt.all_reduce(v).cpu() for k, v in st.items()} for name, st in stats.items()}}


def gptq_factor(gram: Tensor) -> Tensor:
    """Upper Cholesky factor of the inverse input Gram matrix (damped by 1% of its mean diagonal)."""
    damp = 0.01 * float(gram.diagonal().mean()) or 1.0
    h = gram.double() + damp * torch.eye(len(gram), dtype=torch.float64)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def gptq_codes(w: Tensor, scale: Tensor, qmax: Tensor, u: Tensor, block: int = 128) -> Tensor:
    """GPTQ (Frantar et al. 2022) at fixed row steps, batched over matrices of one shape: w [B, rows, cols],
    scale [B, rows], qmax [B], u [B, cols, cols] (gptq_factor)."""
    w, lim = w.float().clone(), qmax.float()[:, None]
    q = torch.empty_like(w)
    for i in range(0, w.shape[-1], block):
        j = min(i + block, w.shape[-1])
        err = torch.empty(*w.shape[:-1], j - i)
        for c in range(i, j):
            q[..., c] = torch.clamp(torch.round(w[..., c] / scale), -lim, lim)
            err[..., c - i] = (w[..., c] - q[..., c] * scale) / u[:, c, c, None]
            w[..., c + 1:j] -= err[..., c - i, None] * u[:, None, c, c + 1:j]
        w[..., j:] -= err @ u[:, i:j, j:]
    return q.to(torch.int8)


class BudgetFit:
    """Every row's step from one trade-off c for the whole artifact (README, budget fit): step = c / sqrt(Fisher
    per weight) within its range; a tensor moves up QMAX_LADDER while most of its rows want finer steps."""

    def __init__(self, state: dict[str, Tensor], stats: dict | None):
        self.fixed, self.rows = {}, {}
        for name in sorted(state):
            t = state[name].detach().float().cpu()
            qmax = quant_levels(name, t)
            if not qmax:
                self.fixed[name] = ("fp16", 0, t.half(), None)
                continue
            st = stats["tensors"].get(name, {}) if stats else {}
            a = st.get("fisher", torch.ones(t.shape[0])) / t.shape[1]
            fine = {q: finest_steps(t, q) for q in QMAX_LADDER if q >= qmax}
            self.rows[name] = {"w": t, "fine": fine, "u": gptq_factor(st["gram"]) if "gram" in st else None,
                               "sens": a.clamp_min(1e-3 * float(a.mean()) or 1e-30),  # rows the data never reached
                               "coarse": torch.maximum(fp16_scale(t.abs().amax(1) / 2), fine[qmax])}
        # the fp16 tensors never change: their frames are measured once, outside the estimate
        self.fixed_bytes = sum(4 + len(zstd_frame(half_planes(q))) for _, _, q, _ in self.fixed.values())
        # log c from "every row wants finer than int8's finest" to "every row at its coarsest"
        rows = self.rows.values()
        self.bounds = ((math.log(min(float((r["fine"][127] * r["sens"].sqrt()).min()) for r in rows)) - 1,
                        math.log(max(float((r["coarse"] * r["sens"].sqrt()).max()) for r in rows)))
                       if self.rows else (0.0, 0.0))

    def quantize(self, c: float, gptq: bool) -> dict[str, tuple]:
        """Every tensor at c. An FP16_ROWS row that wants finer than int8 stays fp16 (step 0): row by row, the
        size moves smoothly with c."""
        out, groups = dict(self.fixed), {}
        for name, r in self.rows.items():
            want = c / r["sens"].sqrt()
            qmax = next(q for q in sorted(r["fine"]) if q == 127 or float((want < r["fine"][q]).float().mean()) <= 0.5)
            s = fp16_scale(torch.clamp(want, r["fine"][qmax], r["coarse"]))
            if name in FP16_ROWS:
                s = torch.where(want < r["fine"][127], 0.0, s)
            if gptq and r["u"] is not None:  # one GPTQ batch per shape
                groups.setdefault(r["w"].shape, []).append((name, qmax, s))
            else:  # the fp16 rows: codes 0, their values after the steps
                keep = s == 0
                q = torch.clamp(torch.round(r["w"] / torch.where(keep, 1.0, s)[:, None]), -qmax, qmax).to(torch.int8)
                out[name] = "int", qmax, q.masked_fill(keep[:, None], 0), torch.cat((s, r["w"][keep].flatten())).half()
        for names, qmaxes, steps in (zip(*group) for group in groups.values()):
            codes = gptq_codes(torch.stack([self.rows[n]["w"] for n in names]), torch.stack(steps),
                               torch.tensor(qmaxes), torch.stack([self.rows[n]["u"] for n in names]))
            out.update({n: ("int", qmax, q, s.half()) for n, qmax, s, q in zip(names, qmaxes, steps, codes)})
        return dict(sorted(out.items()))

    def estimate(self, c: float) -> float:
        """The int tensors' frames at c as ZSTD_SIZING writes them, rounded plainly (GPTQ is too slow to bisect)."""
        return sum(len(tensor_frame(q, s, ZSTD_SIZING)[1]) for kind, _, q, s in self.quantize(c, False).values()
                   if kind == "int")

    def solve(self, factor: float, target: float) -> tuple[float, float]:
        """(log c, estimate) of the finest plan whose fp16 frames plus `factor` x the estimate fit `target`."""
        lo, hi = self.bounds
        best = (lo, self.estimate(math.exp(lo)))
        if self.fixed_bytes + best[1] * factor > target:
            best = (hi, self.estimate(math.exp(hi)))
            for _ in range(16):
                mid = (lo + hi) / 2
                p = self.estimate(math.exp(mid))
                lo, hi, best = (lo, mid, (mid, p)) if self.fixed_bytes + p * factor <= target else (mid, hi, best)
        return best

    def fit(self, limit: int, config: dict, gptq: bool) -> tuple[bytes, dict]:
        """The finest plan whose real artifact fits `limit`; each zstd pass rescales the estimate. A range move can
        jump the size over the window: after three passes, the largest that fitted, else the coarsest plan."""
        factor, best, tried = 1.0, None, set()
        for margin in (FIT_MARGIN, FIT_MARGIN, 4 * FIT_MARGIN, None):
            if margin:
                lc, predicted = self.solve(factor, limit * (1 - margin))
            elif best is None:  # near the coarsest plan real sizes need not fall with c: it decides
                lc, predicted = self.bounds[1], self.estimate(math.exp(self.bounds[1]))
            else:
                break
            if lc in tried:
                break
            tried.add(lc)
            quantized = self.quantize(math.exp(lc), gptq)
            blob = serialize_artifact(quantized, config)
            if len(blob) <= limit and (best is None or len(blob) > len(best[0])):
                best = (blob, quantized, lc, round(self.fixed_bytes + predicted * factor))
            if len(blob) <= limit and (lc == self.bounds[0] or len(blob) >= limit * (1 - 2 * FIT_MARGIN)):
                break
            if len(blob) > limit and lc == self.bounds[1]:
                raise EvalFailure(f"the model cannot fit: {len(blob)} bytes at the coarsest allowed steps > "
                                  f"the {limit} bytes left for it; no artifact written")
            factor = (len(blob) - self.fixed_bytes) / predicted
        if best is None:
            raise EvalFailure(f"the export did not get under {limit} bytes in {len(tried)} passes; no artifact written")
        blob, quantized, lc, predicted = best
        return blob, {"c": math.exp(lc), "passes": len(tried), "predicted": predicted, "quantized": quantized}


def place_values(radices: np.ndarray) -> np.ndarray:
    """Each digit's weight in a mixed-radix number: (36, 6, 1) for radices (7, 6, 6)."""
    return np.cumprod(np.append(radices[1:], 1)[::-1])[::-1]


def code_layouts(q: Tensor) -> dict[str, list[bytes]]:
    """The codes as byte streams: a byte a code ("int"), or magnitudes 2 or 3 to a byte in mixed radix (zstd's
    Huffman spends whole bits a symbol; a group shares that loss) after what the caps cut off (counted: level 22
    prices a block's literals by the one before), then the nonzero codes' signs."""
    codes = q.contiguous().view(-1).numpy()
    m, signs = np.abs(codes.astype(np.int16)), np.packbits(codes[codes != 0] < 0).tobytes()
    layouts = {"int": [codes.tobytes()]}
    for kind, radices in MAGNITUDE_RADICES.items():
        caps = np.array(radices) - 1
        groups = np.append(m, np.zeros(-len(m) % len(radices), np.int16)).reshape(-1, len(radices))
        over = (groups - caps)[groups >= caps].astype(np.uint8)
        symbols = np.minimum(groups, caps) @ place_values(np.array(radices))
        layouts[kind] = [len(over).to_bytes(4, "little") + over.tobytes(), symbols.astype(np.uint8).tobytes(), signs]
    return layouts


def read_codes(raw: bytes, kind: str, numel: int) -> tuple[np.ndarray | None, int]:
    """code_layouts' inverse: (codes, bytes read); an fp16 tensor has none."""
    if kind in ("fp16", "int"):
        return (None, 0) if kind == "fp16" else (np.frombuffer(raw, np.int8, numel), numel)
    if kind not in MAGNITUDE_RADICES:
        raise ValueError(f"unknown layout {kind!r}")
    radices = np.array(MAGNITUDE_RADICES[kind])
    n_over, n_groups = int.from_bytes(raw[:4], "little"), -(-numel // len(radices))
    symbols = np.frombuffer(raw, np.uint8, n_groups, 4 + n_over).astype(np.int16)
    if n_groups and symbols.max() >= radices.prod():
        raise ValueError(f"a {kind} symbol beyond {radices.prod() - 1}")
    low = symbols[:, None] // place_values(radices) % radices
    at_cap = low == radices - 1
    if int(at_cap.sum()) != n_over:
        raise ValueError(f"{n_over} magnitudes over the caps, {int(at_cap.sum())} at them")
    low[at_cap] += np.frombuffer(raw, np.uint8, n_over, 4)
    m = low.ravel()[:numel]
    nonzero, pos = np.flatnonzero(m), 4 + n_over + n_groups
    signs = np.unpackbits(np.frombuffer(raw, np.uint8, (len(nonzero) + 7) // 8, pos))[:len(nonzero)]
    m[nonzero] *= 1 - 2 * signs.astype(np.int64)
    return m, pos + (len(nonzero) + 7) // 8


def zstd_frame(streams: list[bytes], params: zstandard.ZstdCompressionParameters = ZSTD_EXPORT) -> bytes:
    """One frame, each stream in blocks of its own: streams sharing a block share a Huffman table. ZSTD_EXPORT is
    level 22 without matches under 7 bytes: in codes they are chance repeats that cost more than the literals."""
    z = zstandard.ZstdCompressor(compression_params=params).compressobj(size=sum(map(len, streams)))
    return b"".join(z.compress(b) + z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for b in streams) + z.flush()


def half_planes(t: Tensor) -> list[bytes]:
    half = t.reshape(-1).numpy().view(np.uint8)
    return [half[0::2].tobytes(), half[1::2].tobytes()]


def tensor_frame(q: Tensor, s: Tensor | None, params: zstandard.ZstdCompressionParameters = ZSTD_EXPORT
                 ) -> tuple[str, bytes]:
    """(layout, frame) of a tensor: its codes (if any) in the layout whose frame is smallest, then the low and the
    high bytes of its fp16 part."""
    if s is None:
        return "fp16", zstd_frame(half_planes(q), params)
    planes = half_planes(s)
    frames = {kind: zstd_frame(streams + planes, params) for kind, streams in code_layouts(q).items()}
    kind = min(frames, key=lambda k: len(frames[k]))
    return kind, frames[kind]


def dequantize(q: Tensor, s: Tensor | None) -> Tensor:
    """fp16 values; or codes x row steps, where a step of 0 marks a row kept in fp16, its values after the steps."""
    if s is None:
        return q.float()
    steps = s[:len(q)].float()
    w = q.float() * steps[:, None]
    w[steps == 0] = s[len(q):].float().view(-1, q.shape[1])
    return w


def serialize_artifact(quantized: dict[str, tuple], config: dict) -> bytes:
    """A JSON header, then a zstd frame per tensor, so that the fit's estimate holds tensor by tensor."""
    with concurrent.futures.ThreadPoolExecutor() as pool:  # zstd releases the GIL; a compressor per frame
        framed = list(pool.map(lambda t: tensor_frame(t[2], t[3]), quantized.values()))
    entries = [[name, layout, qmax, list(q.shape)]
               for (name, (_, qmax, q, _)), (layout, _) in zip(quantized.items(), framed)]
    header = json.dumps({"format": ARTIFACT_FORMAT, "config": config, "tensors": entries}, sort_keys=True).encode()
    frames = [zstd_frame([header])] + [f for _, f in framed]
    return b"".join(len(f).to_bytes(4, "little") + f for f in frames)


def split_frames(blob: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos < len(blob):
        n = int.from_bytes(blob[pos:pos + 4], "little")
        if n == 0 or pos + 4 + n > len(blob):
            raise ValueError(f"bad frame length {n} at byte {pos}")
        frames.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return frames


def read_artifact(path: str) -> tuple[dict, list[bytes]]:
    """The header and the tensors' frames, still compressed: reading the config decompresses no tensor."""
    if not os.path.isfile(path):
        raise UsageError(f"ARTIFACT_PATH={path} does not exist")
    try:
        with open(path, "rb") as f:
            frames = split_frames(f.read())
        header = json.loads(zstandard.ZstdDecompressor().decompress(frames[0]) if frames else b"")
        if not (isinstance(header, dict) and header.get("format") == ARTIFACT_FORMAT
                and isinstance(header.get("config"), dict)):
            raise ValueError(f"not a {ARTIFACT_FORMAT} artifact")
        if len(header["tensors"]) != len(frames) - 1:
            raise ValueError(f"{len(header['tensors'])} tensors in the header, {len(frames) - 1} frames")
    except ARTIFACT_ERRORS as e:
        raise UsageError(f"artifact {path} is corrupt ({type(e).__name__}: {e})") from None
    return header, frames[1:]


def deserialize_artifact(path: str) -> tuple[dict, dict[str, Tensor]]:
    """(model config, dequantized state); anything malformed is a UsageError naming the file."""
    header, frames = read_artifact(path)
    try:
        state = {}
        for (name, kind, qmax, shape), frame in zip(header["tensors"], frames):
            raw, numel = zstandard.ZstdDecompressor().decompress(frame), math.prod(shape)
            codes, pos = read_codes(raw, kind, numel)
            if codes is not None and numel and int(np.abs(codes.astype(np.int64)).max()) > qmax:
                raise ValueError(f"tensor {name} has codes beyond +-{qmax}")
            half = torch.from_numpy(np.frombuffer(raw, np.uint8, offset=pos).reshape(2, -1).T.copy().view(np.float16))
            q = half.view(shape) if codes is None else torch.from_numpy(codes.astype(np.int8)).view(shape)
            fp16_rows = 0 if codes is None else int((half[:shape[0]] == 0).sum())
            if len(half) != (numel if codes is None else shape[0] + fp16_rows * shape[1]):
                raise ValueError(f"tensor {name} holds {len(raw)} bytes")
            state[name] = dequantize(q, None if codes is None else half.flatten())
    except ARTIFACT_ERRORS as e:
        raise UsageError(f"artifact {path} is corrupt ({type(e).__name__}: {e})") from None
    return header["config"], state


def export_artifact(model: GPT, args: Hyperparameters, rt: Runtime, stats: dict | None, log: Logger) -> None:
    """Fit and write the artifact on rank 0 while the others wait; a failed fit leaves no artifact, stale or new."""
    error = None
    if rt.master:
        t0 = time.perf_counter()
        if os.path.exists(args.artifact_path):
            os.remove(args.artifact_path)
        code_bytes = os.path.getsize(os.path.abspath(__file__))
        try:
            limit = args.artifact_limit_bytes - code_bytes
            config = args.model_config(model.layer_order())
            blob, info = BudgetFit(model.state_dict(), stats).fit(limit, config, args.export_gptq)
            with open(args.artifact_path, "wb") as f:
                f.write(blob)
            log(f"export bytes_model:{len(blob)} predicted:{info['predicted']} limit:{limit} passes:{info['passes']} "
                f"c:{info['c']:.4e} gptq:{int(args.export_gptq)} calib_tokens:{stats['tokens'] if stats else 0} "
                f"export_ms:{1000 * (time.perf_counter() - t0):.0f}")  # tensor by tensor: tools/inspect_artifact.py
        except EvalFailure as e:
            error = f"{e} (ARTIFACT_LIMIT_BYTES={args.artifact_limit_bytes} less {code_bytes} bytes of code)"
    failed = rt.all_reduce(torch.tensor(float(error is not None), device=rt.device)).item()  # also the barrier
    if failed:
        raise EvalFailure(error or "the export failed on rank 0")


def account_artifact(args: Hyperparameters, log: Logger) -> dict:
    """Code bytes (train_gpt.py as it runs) + artifact bytes from disk; over the cap fails after the log line."""
    code_bytes, model_bytes = os.path.getsize(os.path.abspath(__file__)), os.path.getsize(args.artifact_path)
    sizes = {"bytes_code": code_bytes, "bytes_model": model_bytes, "bytes_total": code_bytes + model_bytes}
    log(f"artifact bytes_code:{code_bytes} bytes_model:{model_bytes} bytes_total:{sizes['bytes_total']} "
        f"path:{args.artifact_path}")
    if sizes["bytes_total"] > args.artifact_limit_bytes:
        raise EvalFailure(f"artifact is over the limit: bytes_total {sizes['bytes_total']} > "
                          f"ARTIFACT_LIMIT_BYTES={args.artifact_limit_bytes} (artifact kept at {args.artifact_path})")
    return sizes


def load_artifact_model(args: Hyperparameters, rt: Runtime) -> GPT:
    config, state = deserialize_artifact(args.artifact_path)
    args.apply_model_config(config)
    model = GPT(args).to(rt.device)
    missing = set(model.state_dict()) ^ set(state)
    if missing or config.get("layer_order") not in (model.layer_order(False), model.layer_order(True)):
        raise UsageError(f"artifact {args.artifact_path} is corrupt: tensors {sorted(missing)[:4]} or layer order "
                         f"{config.get('layer_order')} do not match the model")
    model.recur_on = config["layer_order"] != model.layer_order(False)
    model.load_state_dict(state)
    return model.eval()


# -----------------------------------------------------------------------------
# Evaluation: full-coverage sliding window, exact n-gram backoff, causally learned mixing, audit


def window_plan(n_tokens: int, seq_len: int, stride: int) -> Tensor:
    """Window ends: each window scores the targets after the previous end, so every target is scored exactly once."""
    last = n_tokens - 1
    return torch.cat((torch.arange(min(seq_len, last), last, stride), torch.tensor([last])))


def group_sort(keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One stable sort: the permutation, where runs of equal keys start (sorted order) and each entry's count of
    earlier equal keys (stream order)."""
    perm = torch.argsort(keys, stable=True)
    sorted_keys = keys[perm]
    idx = torch.arange(len(keys), device=keys.device)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    rank = idx - torch.cummax(torch.where(starts, idx, 0), dim=0).values
    return perm, starts, torch.empty_like(rank).scatter_(0, perm, rank)


class NgramTables(NamedTuple):
    order: Tensor  # backoff order used at t (0: no context seen NGRAM_MIN_COUNT times)
    p: Tensor      # p_ng(x_t) = c(ctx, x_t) / c(ctx)
    count: Tensor  # c(ctx): earlier positions with t's context, at that order
    top: Tensor    # max_v c(ctx, v): how often the most frequent continuation followed it


def ngram_tables(tokens: Tensor, vocab: int, min_order: int, max_order: int, min_count: int) -> NgramTables:
    """At each t, from earlier positions only, the highest order whose context was seen min_count times. Context
    ids stay exact and dense; one stable sort per order gives its joint counts and the next order's context counts."""
    n, dev = len(tokens), tokens.device
    out = NgramTables(*(tokens.new_zeros(n, dtype=d) for d in (torch.int8, torch.float64, torch.long, torch.long)))
    ids, (perm, starts, pc_k) = tokens, group_sort(tokens)  # 1-token contexts ending at each i
    for k in range(1, min(max_order, n)):  # contexts of k tokens: order k + 1 at positions t >= k
        if int(pc_k.max()) + 1 < min_count:  # no context repeats enough; longer ones repeat less
            break
        keys = torch.cat((-1 - torch.arange(k, device=dev), ids[:-1][k - 1:] * vocab + tokens[k:]))
        perm1, starts1, pc_next = group_sort(keys)  # c(ctx, x_t) at t, order k + 1
        # max_v c_{<t}(ctx, v): over earlier s in t's context group, the joint count including s itself
        w = torch.cat((pc_next[1:] + 1, pc_next.new_zeros(1)))[perm]
        group = torch.cumsum(starts, 0) - 1
        run_max = torch.cummax(group * (n + 1) + w, 0).values - group * (n + 1)
        top_sorted = torch.where(starts, 0, torch.roll(run_max, 1))
        top = torch.empty_like(top_sorted).scatter_(0, perm, top_sorted)
        if k + 1 >= min_order:
            c_ctx = pc_k[k - 1:n - 1]
            hit = c_ctx >= min_count
            out.order[k:][hit] = k + 1
            out.p[k:][hit] = pc_next[k:][hit].double() / c_ctx[hit].double()
            out.count[k:][hit] = c_ctx[hit]
            out.top[k:][hit] = top[k - 1:n - 1][hit]
        ids = torch.empty_like(pc_next).scatter_(0, perm1, torch.cumsum(starts1, 0) - 1)
        perm, starts, pc_k = perm1, starts1, pc_next
    return out


def ngram_alpha(entropy: Tensor, args: Hyperparameters) -> Tensor:
    """The fixed mixing weight: more n-gram where the model is unsure."""
    return args.ngram_ent_base + args.ngram_ent_range * torch.sigmoid(
        args.ngram_ent_scale * (entropy - args.ngram_ent_thresh))


def mixer_inputs(order: Tensor, count: Tensor, top: Tensor, entropy: Tensor, top_p: Tensor,
                 args: Hyperparameters) -> tuple[Tensor, Tensor]:
    """Features known before x_t, and the fixed alpha's logit as offset, so zero weights give the fixed alpha."""
    one_hot = F.one_hot(order.long() - args.ngram_min_order, args.ngram_max_order - args.ngram_min_order + 1)
    c = count.double()
    phi = torch.cat((one_hot.double(), torch.stack((c.log(), top / c, entropy, top_p), 1)), 1)
    return phi, torch.logit(ngram_alpha(entropy, args).clamp(1e-6, 1 - 1e-6))


def mixture_nll(z: Tensor, p_model: Tensor, p_ng: Tensor) -> Tensor:
    return -torch.log(p_model + torch.sigmoid(z) * (p_ng - p_model))


class NgramMixer:
    """alpha_t = trust_t * sigmoid(offset_t + w . phi_t): w refitted on targets already scored, trust_t the posterior
    that the mixture beat the model before t, so it never costs over a bit (README). Fixed: w = 0, trust 1."""

    def __init__(self, args: Hyperparameters, device):
        self.args, self.bounds, self.learn = args, [1], args.ngram_mixer == "learned"
        n_features = args.ngram_max_order - args.ngram_min_order + 5  # mixer_inputs: one-hot order + 4
        self.weights = [torch.zeros(n_features, dtype=torch.float64, device=device)]

    @staticmethod
    def alpha(offset: Tensor, phi: Tensor, w: Tensor) -> Tensor:
        # below 1 - 1e-6: no target gets probability 0, so the evidence stays finite
        return torch.sigmoid(offset + phi @ w).clamp(max=1 - 1e-6)

    def weights_at(self, t: int) -> Tensor:
        return self.weights[bisect.bisect_right(self.bounds, t) - 1]

    def alpha_at(self, t: int, phi: Tensor, offset: Tensor) -> Tensor:
        """The weight in force at matched target t, recomputed from its features for the audit."""
        trust = torch.sigmoid(self.evidence[int(torch.searchsorted(self.pos, t))])
        return trust * self.alpha(offset, phi, self.weights_at(t))

    def fit(self, w: Tensor, phi: Tensor, offset: Tensor, p_model: Tensor, p_ng: Tensor) -> Tensor:
        """Damped Newton steps on the mixture's log loss, with an L2 pull towards zero (the fixed alpha)."""
        lam = self.args.ngram_mix_l2

        def loss(w):
            return float(mixture_nll(offset + phi @ w, p_model, p_ng).mean()) + 0.5 * lam * float(w @ w)

        eye, cur = torch.eye(len(w), dtype=w.dtype, device=w.device), loss(w)
        for _ in range(self.args.ngram_mix_steps):
            a = torch.sigmoid(offset + phi @ w)
            g = -a * (1 - a) * (p_ng - p_model) / (p_model + a * (p_ng - p_model))  # d nll / dz
            curv = g * g + torch.clamp(g * (1 - 2 * a), min=0)  # a PSD part of d2 nll / dz2
            step = torch.linalg.solve(phi.T @ (phi * curv[:, None]) / len(g) + lam * eye, phi.T @ g / len(g) + lam * w)
            for _ in range(4):  # halve until the loss goes down
                new = loss(w - step)
                if new < cur:
                    w, cur = w - step, new
                    break
                step = step / 2
        return w

    def alphas(self, feats: tuple, pos: Tensor, p_model: Tensor, p_ng: Tensor) -> Tensor:
        """alpha at the sorted matched positions `pos`, in chunks doubling from NGRAM_MIX_FIRST targets to
        NGRAM_MIX_CHUNK; a refit sees at most NGRAM_MIX_CHUNK earlier targets, so each stays cheap."""
        args, out, start, size, fitted = self.args, torch.empty_like(p_ng), 1, self.args.ngram_mix_first, 0
        end_all = int(pos[-1]) + 1 if len(pos) else 1
        while start < end_all:
            end = start + size
            lo, hi = (int(torch.searchsorted(pos, b)) for b in (start, end))
            phi, offset = mixer_inputs(*(f[lo:hi] for f in feats), args)
            out[lo:hi] = self.alpha(offset, phi, self.weights[-1])
            if self.learn and fitted < hi < len(pos):  # refit on what is scored, before the next chunk is mixed
                fitted = hi
                seen = torch.arange(0, hi, -(-hi // args.ngram_mix_chunk), device=pos.device)
                phi, offset = mixer_inputs(*(f[seen] for f in feats), args)
                self.weights.append(self.fit(self.weights[-1], phi, offset, p_model[seen], p_ng[seen]))
                self.bounds.append(end)
            start, size = end, min(2 * size, args.ngram_mix_chunk)
        gain = torch.log1p(out * (p_ng / p_model - 1))  # log p_mixed - log p_model
        self.pos = pos  # the evidence before each target (fixed: +inf, trust 1)
        self.evidence = torch.cumsum(gain, 0) - gain if self.learn else torch.full_like(gain, math.inf)
        return out * torch.sigmoid(self.evidence)


def eval_forward(model: GPT, args: Hyperparameters, rt: Runtime):
    """model.hidden, compiled once per model so the passes that share its shapes share the compile."""
    if not (args.compile if args.compile is not None else rt.is_cuda):
        return model.hidden
    if not hasattr(model, "_compiled_hidden"):
        model._compiled_hidden = torch.compile(model.hidden, dynamic=False)
    return model._compiled_hidden


@torch.no_grad()
def eval_logprobs(model: GPT, hidden_fn, inputs: Tensor, rows: Tensor, rt: Runtime) -> Tensor:
    """A float64 head and softmax: a row's probabilities do not depend on its batch (README, eval precision)."""
    with rt.autocast():
        h = hidden_fn(inputs)
    return torch.log_softmax(model.logits(h.flatten(0, 1)[rows], torch.float64), dim=-1)


class Deadline:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def passed(self) -> bool:
        return self.seconds > 0 and self.elapsed() > self.seconds


SCORE_ROWS = ("nll", "entropy", "top_p", "scored")  # per stream position; the last entry: ranks past the deadline


def score_rows(logp: Tensor, nll: Tensor) -> Tensor:
    return torch.stack((nll, -(logp.exp() * logp).sum(-1), logp.max(-1).values.exp(), torch.ones_like(nll)))


def score_windows(model: GPT, val: Tensor, args: Hyperparameters, rt: Runtime, *, seq_len: int, stride: int,
                  deadline: Deadline) -> Tensor:
    """This rank's windows scored into SCORE_ROWS (other ranks' positions stay 0), then 1 if the deadline passed:
    a position has one owner, so the sum over ranks is the whole stream."""
    ends = window_plan(len(val), seq_len, stride)
    new_targets = torch.diff(ends, prepend=ends.new_zeros(1))  # what each window scores
    lo, hi = len(ends) * rt.rank // rt.world_size, len(ends) * (rt.rank + 1) // rt.world_size
    hidden_fn, B = eval_forward(model, args, rt), args.eval_batch_seqs
    buf = torch.zeros(len(SCORE_ROWS) * len(val) + 1, dtype=torch.float64, device=rt.device)
    rows_out = buf[:-1].view(len(SCORE_ROWS), len(val))
    model.eval()
    for b in range(lo, hi, B):
        if deadline.passed():
            break
        # planned on the host, a short last batch padded with windows that score nothing: no data-dependent shapes
        e = min(b + B, hi)
        batch_ends = torch.cat((ends[b:e], ends[e - 1:e].repeat(B - (e - b))))
        n_scored = torch.cat((new_targets[b:e], new_targets.new_zeros(B - (e - b))))
        length = min(seq_len, int(batch_ends[0]))
        offs = torch.arange(length)
        scored = torch.nonzero((offs[None, :] >= (length - n_scored)[:, None]).flatten()).squeeze(1)
        rows = (batch_ends - length)[:, None] + offs
        pos = rt.upload(rows.flatten()[scored] + 1)
        logp = eval_logprobs(model, hidden_fn, val[rt.upload(rows)], rt.upload(scored), rt)
        rows_out[:, pos] = score_rows(logp, -logp.gather(1, val[pos][:, None]).squeeze(1))
    rt.sync()  # in time only if the device's work is
    buf[-1] = float(deadline.passed())
    return buf


def stream_scores(buf: Tensor, val: Tensor, luts, t0: float) -> dict:
    """The summed buffer as per-position tensors, and the score: complete if every target was scored once in time."""
    cols = dict(zip(SCORE_ROWS, buf[:-1].view(len(SCORE_ROWS), len(val))))
    scored = cols["scored"][1:]
    n_scored = int(scored.sum())
    nbytes = int((target_bytes(val[:-1], val[1:], luts).double() * scored).sum())
    nll = float(cols["nll"].sum())
    return {"tokens": n_scored, "bytes": nbytes, "coverage": n_scored / (len(val) - 1),
            "complete": bool((scored == 1).all()) and not buf[-1],
            "loss_model": nll / max(n_scored, 1), "bpb_model": nll / math.log(2) / max(nbytes, 1),
            "eval_ms": 1000 * (time.perf_counter() - t0), "stream": cols}


def evaluate(model: GPT, val: Tensor, luts, args: Hyperparameters, rt: Runtime, *,
             seq_len: int, stride: int, deadline: Deadline) -> dict:
    """Every target of `val` scored once, windows split across ranks; every rank gets the whole stream."""
    t0 = time.perf_counter()
    buf = score_windows(model, val, args, rt, seq_len=seq_len, stride=stride, deadline=deadline)
    return stream_scores(rt.all_reduce(buf), val, luts, t0)


# Score-first test-time training (TTT=1): the eval's stage 1, per-document low-rank adapters


def documents(val: Tensor) -> list[tuple[int, int]]:
    """(start, end) per document, split at BOS: inputs val[start:end] predict targets start+1..end, so the
    documents partition targets 1..N-1 (a BOS target closes the document before it)."""
    starts = [0] + (torch.nonzero(val[1:-1] == BOS_ID).flatten() + 1).tolist()
    return list(zip(starts, starts[1:] + [len(val) - 1]))


def ttt_batches(docs: list[tuple[int, int]], size: int) -> list[list[int]]:
    """Longest first (ties by position), `size` a batch: the same batches on any world size."""
    order = sorted(range(len(docs)), key=lambda d: (docs[d][0] - docs[d][1], d))
    return [order[i:i + size] for i in range(0, len(order), size)]


class DocBatch:
    """Documents scored chunk by chunk with adapters of their own: B = 0, so a first chunk scores as the base model;
    A seeded by the document, so a replay draws the same."""

    def __init__(self, model: GPT, val: Tensor, docs: list[tuple[int, int]], args: Hyperparameters, rt: Runtime,
                 adapt: bool):
        self.model, self.val, self.docs, self.args, self.rt, self.adapters = model, val, docs, args, rt, []
        self.steps = max(-(-(e - s) // args.ttt_chunk) for s, e in docs)
        if not adapt:
            return
        model.requires_grad_(False)  # only the adapters learn
        gens = [torch.Generator().manual_seed(args.seed * 1_000_003 + s) for s, _ in docs]
        targets = [(m, m.in_features, m.out_features) for name, m in model.named_modules()  # q, k, v, o, MLP out
                   if name.startswith("blocks.") and isinstance(m, nn.Linear) and not name.endswith("mlp.fc")]
        for m, n_in, n_out in targets + [(None, model.tok_emb.embedding_dim, model.tok_emb.num_embeddings)]:  # head
            a = torch.stack([torch.randn(args.ttt_rank, n_in, generator=g) / math.sqrt(n_in) for g in gens])
            a = F.pad(a, (0, 0, 0, 0, 0, args.ttt_docs - len(docs)))  # empty slots: adapters that stay zero
            b = torch.zeros(args.ttt_docs, n_out, args.ttt_rank, device=rt.device)
            self.adapters.append((m, a.to(rt.device).requires_grad_(), b.requires_grad_()))
        params = [t for _, a, b in self.adapters for t in (a, b)]
        self.opt = torch.optim.AdamW(params, lr=args.ttt_lr, betas=(0.0, 0.999), weight_decay=args.ttt_wd)

    def chunk(self, i: int, adapt: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(positions, float64 log-probability rows, nll) of every slot's chunk i, by the adapters as they are
        (adapt) or by the base model."""
        C, L, D = self.args.ttt_chunk, self.args.eval_seq_len, self.args.ttt_docs
        spans = [(s + i * C, min(s + (i + 1) * C, e), s) for s, e in self.docs if s + i * C < e]
        spans = [(a, b, max(s, b - L)) for a, b, s in spans] + [(0, 0, 0)] * (D - len(spans))
        T = max(b - w for _, b, w in spans)
        cols, offs = torch.arange(T), torch.arange(C)
        # a slot's window: tokens [w, b), padded after b with its last token; its targets a+1..b are rows a-w..b-1-w
        per_slot = [(torch.clamp(w + cols, max=max(b - 1, 0)), torch.clamp(a - w + offs, max=max(b - 1 - w, 0)),
                     offs < b - a, torch.clamp(a + 1 + offs, max=b)) for a, b, w in spans]
        x, rows, mask, pos = (self.rt.upload(torch.stack(t)) for t in zip(*per_slot))
        adapters = self.adapters if adapt else []
        hooks = [m.register_forward_hook(lambda m, i, out, a=a, b=b: out + i[0] @ a.mT.to(i[0].dtype)
                                         @ b.mT.to(i[0].dtype)) for m, a, b in adapters if m is not None]
        with torch.set_grad_enabled(bool(adapters)):
            try:
                with self.rt.autocast():
                    h = self.model.hidden(self.val[x])
            finally:
                for hook in hooks:
                    hook.remove()
            h = h.gather(1, rows[..., None].expand(-1, -1, h.size(-1))).float()
            delta = next(((h @ a.mT) @ b.mT for m, a, b in adapters if m is None), None)
            logp = torch.log_softmax(self.model.logits(h, torch.float64, delta), dim=-1)
            nll = -logp.gather(-1, self.val[pos][..., None]).squeeze(-1)
            self.loss = ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()  # each slot's own mean
        return pos[mask], logp[mask].detach(), nll[mask].detach()

    def learn(self) -> None:
        self.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class ChunkGuard:
    """A chunk step adapts only if the steps to run (`todo`: unadapted, adapted; the audit's replay steps among them)
    and TTT_RESERVE_SECONDS fit at the mean step times measured on the device, it and its replay steps adapted."""

    def __init__(self, deadline: Deadline, reserve: float, rt: Runtime):
        self.deadline, self.reserve, self.rt, self.todo = deadline, reserve, rt, [0, 0]
        self.spent = [[0.0, 0], [0.0, 0]]  # seconds and steps, without adapters and with

    def fits(self, moved: int = 0) -> bool:
        (s0, n0), (s1, n1), (u, a) = *self.spent, self.todo
        return self.deadline.seconds <= 0 or self.deadline.elapsed() + self.reserve + s1 / max(n1, 1) * (
            a + moved) + s0 / max(n0, 1) * (u - moved) <= self.deadline.seconds

    def timed(self, adapt: bool, steps: int, fn):
        t0 = time.perf_counter()
        out = fn()
        self.rt.sync()  # the device's time, not the launch's
        self.spent[adapt][0] += time.perf_counter() - t0
        self.spent[adapt][1] += steps
        return out


@contextlib.contextmanager
def deterministic():
    """The TTT pass and its replay repeat bit for bit (README); training's faster kernels come back after."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def doc_chunks(docs: list[tuple[int, int]], positions: list[int], args: Hyperparameters) -> list[tuple]:
    """(document, chunk) of each target t: the document with start < t <= end, t's chunk in it."""
    d = torch.searchsorted(torch.tensor([s for s, _ in docs]), torch.tensor(positions, dtype=torch.int64)) - 1
    return [(d, (t - docs[d][0] - 1) // args.ttt_chunk) for t, d in zip(positions, d.tolist())]


def ttt_scores(model: GPT, val: Tensor, args: Hyperparameters, rt: Runtime, deadline: Deadline,
               audit: list[int] = ()) -> tuple[Tensor, Tensor, int]:
    """This rank's batches (every world_size-th) as score_windows' buffer; per document, the chunk steps its batch
    adapted (ChunkGuard); how many of `audit` (audit_share) fit, their replay reserved."""
    docs = documents(val)
    mine = ttt_batches(docs, args.ttt_docs)[rt.rank::rt.world_size]
    buf = torch.zeros(len(SCORE_ROWS) * len(val) + 1, dtype=torch.float64, device=rt.device)
    rows_out, adapted = buf[:-1].view(len(SCORE_ROWS), len(val)), torch.zeros(len(docs), device=rt.device)
    steps = sum(-(-(docs[batch[0]][1] - docs[batch[0]][0]) // args.ttt_chunk) for batch in mine)  # longest first
    guard = ChunkGuard(deadline, args.ttt_reserve_seconds, rt)
    chunks = doc_chunks(docs, audit, args)
    with deterministic():
        if mine:  # both times from the first batch's widest chunk step (discarded), before any decision
            for adapt in (False, True):
                b = DocBatch(model, val, [docs[d] for d in mine[0]], args, rt, adapt)
                guard.timed(adapt, 1, lambda: (b.chunk(b.steps - 1, adapt), adapt and b.learn()))
        for keep in range(len(audit), -1, -1):  # the audit shrinks to what fits, to a pair (one of each half)
            guard.todo = [steps + sum(k + 1 for _, k in chunks[:keep]), 0]  # a replay runs to its chunk
            if keep <= 2 or guard.fits():
                break
        for batch in mine:
            if deadline.passed():
                break
            ks = [k for d, k in chunks[:keep] if d in batch]  # this batch's audited chunks
            first = guard.fits(1 + len(ks))  # the adapters' draw is timed as part of adapting
            b, on = guard.timed(first, 0, lambda: DocBatch(model, val, [docs[d] for d in batch], args, rt, first)), 0
            for i in range(b.steps):
                if deadline.passed():
                    break
                moved = sum(k >= i for k in ks)  # the replay steps that adapt if this one does
                adapt = on == i and first and guard.fits(1 + moved)
                pos, logp, nll = guard.timed(adapt, 1, lambda: b.chunk(i, adapt))
                rows_out[:, pos] = score_rows(logp, nll)
                if adapt:
                    guard.timed(True, 0, b.learn)
                on, moved = on + adapt, moved * adapt
                guard.todo = [guard.todo[0] - 1 - moved, guard.todo[1] + moved]
            adapted[batch] = on
    buf[-1] = float(deadline.passed())
    return buf, adapted, keep


def switched(sliding: dict, ttt: dict) -> dict:
    """p(x_t) = w_t p_ttt + (1 - w_t) p_sliding, w_t the posterior (prior 1/2) that TTT predicted the targets
    before t better: over any prefix at most 1 bit worse than the better pass."""
    a, b = sliding["stream"]["nll"], ttt["stream"]["nll"]
    evidence = torch.cumsum(a - b, 0) - (a - b)
    nll = -torch.logaddexp(F.logsigmoid(evidence) - b, F.logsigmoid(-evidence) - a)
    loss = float(nll.sum().item())
    return dict(ttt, stream=dict(ttt["stream"], nll=nll), switch_evidence=evidence, bpb_adapted=ttt["bpb_model"],
                complete=sliding["complete"] and ttt["complete"], loss_model=loss / max(ttt["tokens"], 1),
                bpb_model=loss / math.log(2) / max(ttt["bytes"], 1))


def ngram_mixture(res: dict, tables: NgramTables, args: Hyperparameters) -> dict:
    """The mixed stream, score first: p = (1 - alpha) p_model + alpha p_ng where a context matched, else p_model."""
    cols, t0 = res["stream"], time.perf_counter()
    pos = torch.nonzero(tables.order[1:] > 0).flatten() + 1
    p_model, p_ng = torch.exp(-cols["nll"][pos]), tables.p[pos]
    feats = (tables.order[pos], tables.count[pos], tables.top[pos], cols["entropy"][pos], cols["top_p"][pos])
    mixer = NgramMixer(args, pos.device)
    alpha = mixer.alphas(feats, pos, p_model, p_ng)
    nll_mixed = cols["nll"].clone()
    nll_mixed[pos] = -torch.log((1 - alpha) * p_model + alpha * p_ng)
    loss = float(nll_mixed.sum().item())
    return dict(res, loss_mixed=loss / max(res["tokens"], 1), bpb_mixed=loss / math.log(2) / max(res["bytes"], 1),
                nll_mixed=nll_mixed, alpha=alpha, mixer=mixer, mix_ms=1000 * (time.perf_counter() - t0))


def final_line(kind: str, res: dict, which: str = "model") -> str:
    tail = f"tokens:{res['tokens']} bytes:{res['bytes']} coverage:{res['coverage']:.6f} eval_ms:{res['eval_ms']:.0f}"
    if not res["complete"]:
        return f"final_{kind} INCOMPLETE {tail}"
    return f"final_{kind} val_loss:{res['loss_' + which]:.8f} val_bpb:{res['bpb_' + which]:.8f} {tail}"


# The audit: for sampled targets, the whole V-way mixed distribution rebuilt without the fast path (README).

AUDIT_TOL = 1e-6  # on every device: both sides are float64 heads on bitwise-equal hidden states


def audit_positions(order: Tensor, count: int, seed: int) -> list[int]:
    """Half uniform over all targets, half over matched ones, in turn (any prefix holds both); the same on every
    rank (numpy draws), O(count) memory."""
    rng = np.random.default_rng(seed)
    n = len(order)
    uniform = (rng.choice(n - 1, size=min(count - count // 2, n - 1), replace=False) + 1).tolist()
    matched = torch.cumsum(order[1:] > 0, 0)  # matched[i]: how many of the targets 1..i+1 matched
    m = int(matched[-1])
    ranks = torch.from_numpy(rng.choice(m, size=min(count // 2, m), replace=False) + 1).to(order.device)
    hits = (torch.searchsorted(matched, ranks) + 1).tolist()
    return list(dict.fromkeys(t for i in range(max(len(uniform), len(hits))) for t in uniform[i:i + 1] + hits[i:i + 1]))


def brute_force_ngram(tokens: Tensor, t: int, vocab: int, args: Hyperparameters) -> tuple[Tensor | None, int, int]:
    """(distribution, order, c(ctx)) at t, rebuilt from the prefix tokens[:t] by direct comparison."""
    for n in range(min(args.ngram_max_order, t), args.ngram_min_order - 1, -1):  # an order-n context needs t >= n
        k = n - 1
        windows = tokens[:t - 1].unfold(0, k, 1)  # windows[i] = tokens[i:i+k], context of position i+k
        match = (windows == tokens[t - k:t]).all(dim=1)
        c = int(match.sum())
        if c >= args.ngram_min_count:
            return torch.bincount(tokens[k:t][match], minlength=vocab).double() / c, n, c
    return None, 0, 0


def audit_model_logp(model: GPT, val: Tensor, positions: list[int], args: Hyperparameters, rt: Runtime) -> Tensor:
    """The model's float64 row at each target t from t's window with every token from t on replaced (x -> x+1 mod V),
    in the fast path's batch shape and precision: a causal model gives its hidden state, a leaking one does not."""
    n, B = len(val), args.eval_batch_seqs
    ends = window_plan(n, args.eval_seq_len, args.eval_stride)
    length = min(args.eval_seq_len, n - 1)
    hidden_fn = eval_forward(model, args, rt)
    out = [torch.zeros(0, args.vocab_size, dtype=torch.float64, device=rt.device)]  # no rows for no positions
    for i in range(0, len(positions), B):
        t = torch.tensor(positions[i:i + B], dtype=torch.int64)
        k = len(t)
        t = torch.cat((t, t[-1:].repeat(B - k)))  # padded to the batch size the fast path ran
        start = ends[torch.searchsorted(ends, t)] - length
        idx = rt.upload(start[:, None] + torch.arange(length))
        x = val[idx]
        x = torch.where(idx >= rt.upload(t)[:, None], (x + 1) % args.vocab_size, x)
        out.append(eval_logprobs(model, hidden_fn, x, rt.upload(torch.arange(k) * length + t[:k] - 1 - start[:k]), rt))
    return torch.cat(out)


def ttt_audit_rows(model: GPT, val: Tensor, positions: list[int], args: Hyperparameters, rt: Runtime,
                   adapted: Tensor) -> Tensor:
    """audit_model_logp for the TTT pass: each batch replayed to its last audited chunk, adapting where the fast path
    did, each audited document changed from its t on (one a round): adapters that saw x_t disagree with it."""
    docs, rows, plan, seen = documents(val), {}, collections.defaultdict(list), collections.Counter()
    batch_of = {d: tuple(batch) for batch in ttt_batches(docs, args.ttt_docs) for d in batch}
    for t, (d, k) in zip(positions, doc_chunks(docs, positions, args)):
        plan[batch_of[d], seen[d]].append((t, d, k))
        seen[d] += 1
    with deterministic():
        for (batch, _), group in plan.items():
            changed, on = val.clone(), int(adapted[batch[0]])
            for t, d, _ in group:
                changed[t:docs[d][1]] = (val[t:docs[d][1]] + 1) % args.vocab_size
            b = DocBatch(model, changed, [docs[d] for d in batch], args, rt, on > 0)
            for i in range(max(k for *_, k in group) + 1):
                pos, logp, _ = b.chunk(i, i < on)
                rows.update({t: logp[pos == t] for t, _, k in group if k == i})
                if i < on:
                    b.learn()
    return torch.cat([torch.zeros(0, args.vocab_size, dtype=torch.float64, device=rt.device)]
                     + [rows[t] for t in positions])


def audit_ngram(records: list, logp_rows: Tensor, tokens: Tensor, vocab: int, args: Hyperparameters, alpha_at,
                dist_fn=brute_force_ngram, feature_rows: Tensor | None = None) -> dict:
    """Each record (t, p_fast, order_fast) rebuilt from its own model row, the brute-force n-gram and alpha_at (on
    the row's, or feature_rows', entropy and top probability): the mixture must sum to 1 and match the fast path."""
    sum_err, target_err, order_mismatch = 0.0, 0.0, 0
    feature_rows = logp_rows if feature_rows is None else feature_rows
    for (t, p_fast, order_fast), logp, feat in zip(records, logp_rows, feature_rows):
        p_model, p_feat = logp.exp(), feat.exp()
        dist_ng, order, count = dist_fn(tokens, t, vocab, args)
        p_mix = p_model
        if dist_ng is not None:
            entropy, c = -(p_feat * feat).sum(), torch.tensor(float(count), dtype=torch.float64, device=logp.device)
            feats = (torch.tensor(order, device=logp.device), c, torch.round(dist_ng.max() * c), entropy, p_feat.max())
            alpha = alpha_at(t, *mixer_inputs(*(v.reshape(1) for v in feats), args))[0]
            p_mix = (1 - alpha) * p_model + alpha * dist_ng
        sum_err = max(sum_err, abs(float(p_mix.sum()) - 1.0))
        target_err = max(target_err, abs(float(p_mix[tokens[t]]) - p_fast))
        order_mismatch += int(order != order_fast)
    return {"positions": len(records), "max_sum_err": sum_err, "max_target_err": target_err,
            "order_mismatch": order_mismatch}


def audit_share(picks: list[int], rt: Runtime) -> list[int]:
    """This rank's audit positions: pairs dealt in turn, so each rank holds both halves (audit_positions)."""
    return [t for i, t in enumerate(picks) if i // 2 % rt.world_size == rt.rank]


def run_audit(model: GPT, val: Tensor, mixed: dict, tables: NgramTables, mine: list[int], args: Hyperparameters,
              rt: Runtime, deadline: Deadline) -> dict:
    """Each rank audits `mine` (a prefix of its audit_share); the reports are merged on every rank."""
    records = [(t, math.exp(-float(mixed["nll_mixed"][t])), int(tables.order[t])) for t in mine]
    rows = feature_rows = audit_model_logp(model, val, mine, args, rt)
    if args.ttt:  # the switch's mixture of the replayed TTT row and the sliding row; features from the TTT row
        feature_rows = ttt_audit_rows(model, val, mine, args, rt, mixed["adapted"])
        ev = mixed["switch_evidence"][torch.tensor(mine, dtype=torch.int64, device=val.device)][:, None]
        rows = torch.logaddexp(F.logsigmoid(ev) + feature_rows, F.logsigmoid(-ev) + rows)
    rep = audit_ngram(records, rows, val, args.vocab_size, args, mixed["mixer"].alpha_at, feature_rows=feature_rows)
    parts = rt.gather_objects(dict(rep, late=deadline.passed()))
    return {**{k: sum(p[k] for p in parts) for k in ("positions", "order_mismatch")},
            **{k: max(p[k] for p in parts) for k in ("max_sum_err", "max_target_err")},
            "late": any(p["late"] for p in parts)}


def run_final_eval(model: GPT, val: Tensor, luts, args: Hyperparameters, rt: Runtime, log: Logger,
                   deadline: Deadline, timings: dict) -> tuple[dict, dict, dict | None]:
    """The sliding window; with TTT=1 the TTT pass behind the switch, which the mixture takes; the n-gram mixture
    once the audit has passed, complete only if all of it ends inside the deadline."""
    res = evaluate(model, val, luts, args, rt, seq_len=args.eval_seq_len, stride=args.eval_stride, deadline=deadline)
    timings["sliding_ms"] = res["eval_ms"]
    log(final_line("sliding", res))
    base, mixed, tables, picks = res, None, None, []
    if args.ngram:  # drawn before the TTT pass, which reserves the time of its share of the audit's replay
        t0 = time.perf_counter()
        tables = ngram_tables(val, args.vocab_size, args.ngram_min_order, args.ngram_max_order, args.ngram_min_count)
        picks = audit_positions(tables.order, args.ngram_audit_positions, args.seed)
        rt.sync()
        timings["ngram_precompute_ms"] = 1000 * (time.perf_counter() - t0)
    mine = audit_share(picks, rt)
    if args.ttt:
        t0 = time.perf_counter()
        buf, adapted, keep = ttt_scores(model, val, args, rt, deadline, mine)
        base, mine = dict(switched(res, stream_scores(rt.all_reduce(buf), val, luts, t0)),
                          adapted=rt.all_reduce(adapted)), mine[:keep]
        timings["ttt_ms"], weight = base["eval_ms"], float(torch.sigmoid(base["switch_evidence"][-1]))
        log(f"ttt docs:{len(adapted)} adapted:{int((base['adapted'] > 0).sum())} "
            f"val_bpb_adapted:{base['bpb_adapted']:.8f} switch_weight:{weight:.4f}")
        log(final_line("ttt", base))
    if args.ngram:
        mixed = dict(base)  # an incomplete pass leaves nothing to mix: the n-gram score is INCOMPLETE too
        if base["complete"]:
            mixed = ngram_mixture(base, tables, args)
            timings["mix_ms"] = mixed["mix_ms"]
            mixed["eval_ms"] = base["eval_ms"] + timings["ngram_precompute_ms"] + mixed["mix_ms"]
            m = mixed["mixer"]  # its effect by n-gram order: tools/eval_dump.py
            log(f"ngram_mix mixer:{args.ngram_mixer}" + (
                f" refits:{len(m.weights) - 1} final_trust:{float(torch.sigmoid(m.evidence[-1:]).sum()):.4f} weights:"
                + ",".join(f"{v:.3g}" for v in m.weights[-1].tolist()) if m.learn else ""))
            t0 = time.perf_counter()
            rep = run_audit(model, val, mixed, tables, mine, args, rt, deadline)
            timings["audit_ms"] = 1000 * (time.perf_counter() - t0)
            log(f"ngram_audit positions:{rep['positions']} max_sum_err:{rep['max_sum_err']:.3e} "
                f"max_target_err:{rep['max_target_err']:.3e} order_mismatch:{rep['order_mismatch']} tol:{AUDIT_TOL:g} "
                f"sampled:{len(picks)}" + (rep["positions"] < len(picks)) * " (shrunk to fit the budget)")
            if rep["max_sum_err"] > AUDIT_TOL or rep["max_target_err"] > AUDIT_TOL or rep["order_mismatch"]:
                raise EvalFailure(f"n-gram audit failed, no n-gram score is reported: {rep}, sampled {len(picks)}")
            mixed["complete"] = not rep["late"]
        log(final_line("ngram", mixed, "mixed"))
    return res, base, mixed


# -----------------------------------------------------------------------------
# Main


def train_and_export(args: Hyperparameters, rt: Runtime, log: Logger, val: Tensor, luts, train_paths) -> dict:
    model = GPT(args).to(rt.device)
    sizes = {k: sum(p.numel() for p in v) for k, v in param_groups(model).items()}
    log(f"model_params:{sum(sizes.values())} " + " ".join(f"{k}:{n}" for k, n in sizes.items()))
    trainer = Trainer(args, rt, model, BatchLoader(train_paths, args, rt), log)
    trainer.warmup()
    stats = trainer.train()
    pre = evaluate(model, val, luts, args, rt, seq_len=args.train_seq_len, stride=args.train_seq_len,
                   deadline=Deadline(0))
    log(final_line("prequant", pre))
    export_artifact(model, args, rt, stats["calib"], log)
    return {"steps": stats["steps"], "train_seconds": round(stats["train_seconds"], 3), **account_artifact(args, log)}


def evaluate_artifact(args: Hyperparameters, rt: Runtime, log: Logger, val: Tensor, luts) -> dict:
    """Everything the eval does, on a model rebuilt from the artifact alone, inside EVAL_BUDGET_SECONDS."""
    deadline, timings = Deadline(args.eval_budget_seconds), {}
    model = load_artifact_model(args, rt)
    timings["load_ms"] = 1000 * deadline.elapsed()
    plain = evaluate(model, val, luts, args, rt, seq_len=args.train_seq_len, stride=args.train_seq_len,
                     deadline=deadline)
    timings["roundtrip_ms"] = plain["eval_ms"]
    log(final_line("roundtrip", plain))
    sliding, base, mixed = run_final_eval(model, val, luts, args, rt, log, deadline, timings)
    timings["total_ms"] = 1000 * deadline.elapsed()
    log("eval_time " + " ".join(f"{k}:{v:.0f}" for k, v in timings.items()) + f" budget_s:{args.eval_budget_seconds:g}")
    if not all(r["complete"] for r in (plain, sliding, base, mixed or base)):
        msg = (f"eval INCOMPLETE: sliding coverage {sliding['coverage']:.6f}, eval time "
               f"{timings['total_ms'] / 1000:.1f} s of EVAL_BUDGET_SECONDS={args.eval_budget_seconds:g}; no score")
        log(msg)
        raise EvalFailure(msg)
    final, kind = (mixed, "mixed") if mixed else (base, "model")
    return {"val_bpb": round(final[f"bpb_{kind}"], 8), "val_bpb_sliding": round(sliding["bpb_model"], 8),
            **({"val_bpb_ttt": round(base["bpb_model"], 8)} if args.ttt else {}),
            "val_loss": round(final[f"loss_{kind}"], 8), "eval_seconds": round(timings["total_ms"] / 1000, 3)}


def run() -> None:
    args = Hyperparameters(int(os.environ.get("WORLD_SIZE", "1")))
    sp = load_tokenizer(args.tokenizer_path, args.vocab_size)
    train_paths = [] if args.eval_only else find_shards(args.data_path, "train")
    val_paths = find_shards(args.data_path, "val")
    rt = Runtime(args.device)
    validate_shards(train_paths + val_paths, args.vocab_size, rt)
    log = Logger(args, rt)
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        log(f.read(), console=False)
    log("=" * 100, console=False)
    for key in sorted(vars(args)):
        log(f"hparam {key}:{getattr(args, key)}")
    device_name = torch.cuda.get_device_name(rt.device) if rt.is_cuda else "cpu"
    log(f"env torch:{torch.__version__} device:{rt.device} device_name:{device_name} world_size:{rt.world_size}")
    torch.manual_seed(args.seed)
    val = load_validation(args, rt)
    luts = tuple(torch.from_numpy(a).to(rt.device) for a in byte_luts(sp))
    log(f"val_tokens:{len(val)}")
    fields = account_artifact(args, log) if args.eval_only else train_and_export(args, rt, log, val, luts, train_paths)
    fields.update(evaluate_artifact(args, rt, log, val, luts))
    if rt.master:
        with open(args.submission_path, "w", encoding="utf-8") as f:
            name = f"10L XSA+VRL+BigramHash+SmearGate, int5/int6+zstd, exact n-gram backoff (run {args.run_id})"
            json.dump({"name": name, "author": args.author or None, "github_id": args.github_id or None,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "seed": args.seed, "world_size": rt.world_size, "device": device_name, **fields}, f, indent=2)
        log(f"submission path:{args.submission_path}")


def main() -> int:
    code = 0
    try:
        run()
    except (UsageError, EvalFailure) as e:
        code = 2 if isinstance(e, UsageError) else 3
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        if code in (0, 3):  # every rank got here on the same path: let none tear down while another still talks
            dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
