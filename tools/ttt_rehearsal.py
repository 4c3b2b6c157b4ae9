"""The TTT pass's time guard at full size, rehearsed on the CPU in simulated time (issue 28).

The real ttt_scores and ttt_audit_rows of train_gpt.py run over a validation stream the size of FineWeb's
(50,000 documents, 62,021,846 tokens), with DocBatch replaced by a stand-in whose chunk steps compute nothing and
move a simulated clock by what the step would cost on a GPU (a cost model, below): the guard's decisions, the
audit's shrinking and the replay's grouping are this revision's code; only the time is modelled. The same runs go
through the guard as it was before (--old-commit, read from git), whose audit replay was not reserved and whose
first batch was always adapted.

Document lengths take the shape of a real corpus's validation documents (--data: a directory of shards, split at
BOS), scaled to FineWeb's mean (62,021,846 / 50,000 = 1,240.4 tokens) and drawn 50,000 times per seed.

Cost model (seconds; every number a flag): a chunk step of W window tokens (slots x the widest window) costs
--overhead + W x --base-us to score with the base model; adapting costs --adapt-factor x that (hooks, backward,
the adapters' AdamW step); each adapted batch's adapter draw costs --draw-s; each step's time is multiplied by
a lognormal jitter (--jitter). Before the pass, --before-s (load, round trip, sliding window, n-gram tables); after
the audit, --after-s (mixing, the sliding rows of the audit). Defaults: --base-us from the H200's measured training
rate (1.31M tokens/s forward+backward at full size, docs/runs/gpu_check_1xh200.txt: 0.76 us a token, a third of it
the forward) times 2 for eager mode; the rest are guesses for a GPU session to replace with tools/gpu_check.sh's
numbers.

    python tools/ttt_rehearsal.py --data runs/english/debdocs/data              # 5 seeds, 8 ranks, both guards
    python tools/ttt_rehearsal.py --data DIR --seeds 1 --ranks 1 --docs 2000    # a small one
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt  # noqa: E402

VAL_TOKENS, VAL_DOCS = 62_021_846, 50_000


class Clock:
    now = 0.0


def corpus_lengths(data: str) -> np.ndarray:
    val = torch.cat([torch.from_numpy(train_gpt.shard_tokens(p).astype(np.int64))
                     for p in train_gpt.find_shards(data, "val")])
    return np.array([e - s for s, e in train_gpt.documents(val)])


def draw_stream(shape: np.ndarray, docs: int, tokens: int, rng) -> torch.Tensor:
    """`docs` documents whose lengths are draws from `shape` scaled so that they hold `tokens` targets in all."""
    lengths = rng.choice(shape, size=docs).astype(np.float64)
    lengths = np.maximum(1, np.round(lengths * tokens / lengths.sum())).astype(np.int64)
    lengths[np.argmax(lengths)] += tokens - int(lengths.sum())  # exact total
    val = torch.full((tokens + 1,), 2, dtype=torch.int64)
    val[torch.from_numpy(np.concatenate(([0], np.cumsum(lengths)[:-1])))] = train_gpt.BOS_ID
    return val


def sim_batch(cost: dict, rng):
    """A DocBatch that costs time instead of computing: same steps, same positions scored, rows of three outcomes."""
    class SimBatch:
        def __init__(self, model, val, docs, args, rt, adapt):
            self.docs, self.args, self.adapters = docs, args, [None] if adapt else []
            self.steps = max(-(-(e - s) // args.ttt_chunk) for s, e in docs)
            Clock.now += cost["draw_s"] if adapt else 0.0

        def chunk(self, i, adapt=None):
            C, L, D = self.args.ttt_chunk, self.args.eval_seq_len, self.args.ttt_docs
            spans = [(s + i * C, min(s + (i + 1) * C, e), s) for s, e in self.docs if s + i * C < e]
            width = min(L, max(b - s for _, b, s in spans))
            self.step_s = (cost["overhead"] + D * width * cost["base_us"] * 1e-6) * rng.lognormal(0, cost["jitter"])
            adapted = bool(self.adapters) if adapt is None else adapt and bool(self.adapters)
            Clock.now += self.step_s * (1 + (cost["adapt_factor"] - 1) / 3 if adapted else 1)
            pos = torch.cat([torch.arange(a + 1, b + 1) for a, b, _ in spans])
            logp = torch.full((len(pos), 3), -math.log(3), dtype=torch.float64)
            return pos, logp, -logp[:, 0]

        def learn(self):  # the backward and the step: the rest of an adapted step's cost
            Clock.now += self.step_s * (cost["adapt_factor"] - 1) * 2 / 3
    return SimBatch


def old_module(commit: str) -> types.ModuleType:
    src = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:train_gpt.py"], check=True, capture_output=True,
                         text=True).stdout
    mod = types.ModuleType("train_gpt_old")
    mod.__file__ = os.path.join(ROOT, "train_gpt.py")
    sys.modules["train_gpt_old"] = mod  # dataclass-like lookups by module name
    exec(compile(src, f"{commit}:train_gpt.py", "exec"), mod.__dict__)
    return mod


def rehearse(T, val: torch.Tensor, args, ranks: int, picks: list[int], cost: dict, seed: int, budget: float) -> list:
    """Per rank: (pass end, audit end, total, chunks adapted / run, audit kept / share) in simulated seconds."""
    out = []
    for r in range(ranks):
        rng = np.random.default_rng([seed, r])
        T.DocBatch = sim_batch(cost, rng)
        rt = types.SimpleNamespace(rank=r, world_size=ranks, device=torch.device("cpu"), is_cuda=False,
                                   sync=lambda: None, autocast=None)
        Clock.now = 0.0
        deadline = T.Deadline(budget)
        Clock.now = cost["before_s"]
        new = hasattr(T, "ChunkGuard")
        if new:
            mine = [t for i, t in enumerate(picks) if i // 2 % ranks == r]
            buf, adapted, keep = T.ttt_scores(None, val, args, rt, deadline, mine)
            mine = mine[:keep]
        else:
            mine = sorted(picks)[r::ranks]
            buf, adapted = T.ttt_scores(None, val, args, rt, deadline)
            keep = len(mine)
        pass_end = Clock.now
        T.ttt_audit_rows(None, val, mine, args, rt, adapted)
        audit_end = Clock.now
        docs = T.documents(val)
        batches = T.ttt_batches(docs, args.ttt_docs)[r::ranks]
        run = sum(-(-(docs[b[0]][1] - docs[b[0]][0]) // args.ttt_chunk) for b in batches)
        done = (int(adapted[[b[0] for b in batches]].sum()) if new else
                sum(-(-(docs[b[0]][1] - docs[b[0]][0]) // args.ttt_chunk) for b in batches if adapted[b[0]]))
        out.append((pass_end, audit_end, audit_end + cost["after_s"], done, run, keep,
                    len([t for i, t in enumerate(picks) if i // 2 % ranks == r]), bool(buf[-1])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="shards whose validation documents give the length shape")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--docs", type=int, default=VAL_DOCS)
    ap.add_argument("--tokens", type=int, default=VAL_TOKENS)
    ap.add_argument("--budget", type=float, default=600.0)
    ap.add_argument("--reserve", type=float, default=60.0, help="TTT_RESERVE_SECONDS")
    ap.add_argument("--audit", type=int, default=256, help="NGRAM_AUDIT_POSITIONS")
    ap.add_argument("--base-us", type=float, default=0.5, help="us a window token, base model forward")
    ap.add_argument("--adapt-factor", type=float, default=3.0)
    ap.add_argument("--overhead", type=float, default=0.003, help="s a chunk step (launches, host work)")
    ap.add_argument("--draw-s", type=float, default=0.3, help="s to draw a batch's adapters")
    ap.add_argument("--jitter", type=float, default=0.1)
    ap.add_argument("--before-s", type=float, default=75.0)
    ap.add_argument("--after-s", type=float, default=10.0)
    ap.add_argument("--old-commit", default="f8421ee")
    a = ap.parse_args()
    cost = dict(base_us=a.base_us, adapt_factor=a.adapt_factor, overhead=a.overhead, draw_s=a.draw_s,
                jitter=a.jitter, before_s=a.before_s, after_s=a.after_s)
    os.environ.update(TTT="1", TTT_RESERVE_SECONDS=str(a.reserve), EVAL_BUDGET_SECONDS=str(a.budget))
    args = train_gpt.Hyperparameters()
    args.vocab_size = 3  # the stand-in's rows: BOS, the filler token and the replay's changed token
    shape = corpus_lengths(a.data)
    print(f"# shape: {len(shape)} documents of {a.data}, mean {shape.mean():.1f} tokens, p50 {np.median(shape):.0f}, "
          f"p99 {np.percentile(shape, 99):.0f}, max {shape.max()}; scaled to {a.tokens} tokens in {a.docs} documents")
    print(f"# model: {cost} budget:{a.budget} reserve:{a.reserve} audit:{a.audit} ranks:{a.ranks} ttt_docs:"
          f"{args.ttt_docs} chunk:{args.ttt_chunk} window:{args.eval_seq_len}", flush=True)
    guards = {"new": train_gpt, "old": old_module(a.old_commit)}
    real = time.perf_counter
    time.perf_counter = lambda: Clock.now  # every clock the passes read is the simulated one
    try:
        for seed in a.seeds:
            rng = np.random.default_rng(seed)
            val = draw_stream(shape, a.docs, a.tokens, rng)
            picks = list(dict.fromkeys((rng.choice(len(val) - 1, size=a.audit, replace=False) + 1).tolist()))
            for name, T in guards.items():
                rows = rehearse(T, val, args, a.ranks, picks, cost, seed, a.budget)
                worst = max(rows, key=lambda x: x[2])
                done, run = sum(x[3] for x in rows), sum(x[4] for x in rows)
                print(f"seed:{seed} guard:{name} longest_doc:{int(torch.diff(torch.nonzero(val == 1).flatten()).max())} "
                      f"worst_rank_total_s:{worst[2]:.1f} pass_end_s:{worst[0]:.1f} audit_end_s:{worst[1]:.1f} "
                      f"in_time:{all(x[2] <= a.budget and not x[7] for x in rows)} adapted_chunk_steps:{done}/{run} "
                      f"audit_kept:{sum(x[5] for x in rows)}/{sum(x[6] for x in rows)}", flush=True)
    finally:
        time.perf_counter = real


if __name__ == "__main__":
    main()
