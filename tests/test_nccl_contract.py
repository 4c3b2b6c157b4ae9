"""The NCCL contract (tests/nccl_contract.py) that every multi-process test runs under: it must reject what
ProcessGroupNCCL rejects, accept what the script hands it, cover every collective train_gpt.py calls, and end
a run that breaks it at once, with one clear line, instead of leaving the other ranks waiting."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import nccl_contract
import train_gpt
from conftest import ROOT, command

SUM, BAND = dist.ReduceOp.SUM, dist.ReduceOp.BAND


def check(name, *args, world=2, device="cpu", **kwargs):
    return nccl_contract.check_call(name, args, kwargs, world, device)


def tall_batch_as_newton_schulz_returned_it():
    """What Muon handed to all_gather before issue 16: newton_schulz of a batch of tall matrices (rows >
    cols) comes back as the transpose of a wide product, a view that is not contiguous."""
    x = torch.randn(1, 128, 32)
    out = train_gpt.newton_schulz(x, torch.float32)
    assert out.shape == x.shape and not out.is_contiguous()
    return out


@pytest.mark.parametrize("name,args,kwargs,message", [
    ("all_gather", "old_muon", {}, "is not contiguous"),
    ("all_gather_into_tensor", "old_muon_into", {}, "is not contiguous"),
    ("all_reduce", "sparse", {}, "dense tensors only"),
    ("all_reduce", "uint16", {}, "no type for"),
    ("all_reduce", "band", {}, "not one NCCL has"),
    ("all_reduce", "off_device", {}, "take cpu tensors"),
    ("all_gather_into_tensor", "dtype_mismatch", {}, "!= input"),
    ("all_gather_into_tensor", "wrong_size", {}, "not world size 2 x 6"),
    ("all_gather", "wrong_count", {}, "3 outputs for world size 2"),
    ("all_gather", "wrong_shape", {}, "output 1 is (3, 2)"),
    ("all_gather_object", "short_list", {}, "output list of world size 2"),
    ("reduce_scatter_tensor", "unknown", {}, "not covered by the contract"),
])
def test_contract_rejects_what_nccl_rejects(name, args, kwargs, message):
    t = torch.zeros(2, 3)
    cases = {
        "old_muon": lambda: ([torch.empty(1, 128, 32), torch.empty(1, 128, 32)], tall_batch_as_newton_schulz_returned_it()),
        "old_muon_into": lambda: (torch.empty(2, 128, 32), tall_batch_as_newton_schulz_returned_it()),
        "sparse": lambda: (t.to_sparse(),),
        "uint16": lambda: (torch.zeros(2, dtype=torch.uint16),),
        "band": lambda: (t.long(), BAND),
        "off_device": lambda: (torch.zeros(2, device="meta"),),
        "dtype_mismatch": lambda: (torch.zeros(12, dtype=torch.float64), t),
        "wrong_size": lambda: (torch.zeros(11), t),
        "wrong_count": lambda: ([t.clone() for _ in range(3)], t),
        "wrong_shape": lambda: ([t.clone(), torch.zeros(3, 2)], t),
        "short_list": lambda: ([None], {"x": 1}),
        "unknown": lambda: (t, t),
    }
    with pytest.raises(nccl_contract.ContractViolation, match=re.escape(message)):
        check(name, *cases[args](), **kwargs)


def test_contract_accepts_the_calls_the_script_makes():
    x = torch.randn(1, 128, 32)
    ours = train_gpt.newton_schulz(x, torch.float32).contiguous()  # what Muon gathers now
    assert check("all_gather_into_tensor", torch.empty(2, 128, 32), ours)[0] == "all_gather_into_tensor"
    assert check("all_reduce", torch.zeros(5, dtype=torch.float64)) == ("all_reduce", [[5]], ["torch.float64"], str(SUM))
    assert check("all_reduce", torch.zeros(3, dtype=torch.int64), dist.ReduceOp.MAX)[3] == str(dist.ReduceOp.MAX)
    assert check("all_reduce", torch.stack((torch.zeros(()), torch.ones(()))))[1] == [[2]]
    assert check("all_gather_object", [None, None], {"a": 1}) == ("all_gather_object", [], [], "")
    assert check("barrier") == ("barrier", [], [], "")
    with pytest.raises(nccl_contract.ContractViolation, match="take cuda tensors"):
        check("all_reduce", torch.zeros(2), device="cuda")


def test_every_collective_the_script_calls_is_checked():
    """A collective added to train_gpt.py later must be added to the contract too, or this fails."""
    source = open(os.path.join(ROOT, "train_gpt.py"), encoding="utf-8").read()
    called = set(re.findall(r"\bdist\.(\w+)\(", source))
    not_collectives = {"init_process_group", "is_initialized", "get_rank", "get_world_size", "destroy_process_group"}
    assert "all_gather_into_tensor" in called and "all_reduce" in called
    assert called - not_collectives <= set(nccl_contract.CHECKED), called - not_collectives - set(nccl_contract.CHECKED)


TRANSPOSED_GATHER = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.arange(12.0).view(4, 3).T  # a transposed view: gloo flattens it, NCCL refuses it
out = [torch.empty(3, 4) for _ in range(2)]
dist.all_gather(out, x)
open(f"gathered.rank{dist.get_rank()}", "w").write(str(torch.equal(out[0], x)))
dist.destroy_process_group()
"""


def run_transposed_gather(tmp_path, contract: bool) -> subprocess.CompletedProcess:
    """Two gloo processes all-gathering a transposed view, under the NCCL contract or under plain torchrun."""
    script = tmp_path / "gather.py"
    script.write_text(TRANSPOSED_GATHER)
    cmd = command(str(script), 2) if contract else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "PYTHONPATH", "LANG")}
    return subprocess.run(cmd, cwd=str(tmp_path), env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)


def test_a_violation_ends_the_run_at_once_with_one_line(tmp_path):
    """One collective NCCL would reject: both ranks stop with the contract's line and exit code 97 within seconds,
    before the collective runs (with a real mismatch the other rank would wait out the group's timeout)."""
    t0 = time.perf_counter()
    proc = run_transposed_gather(tmp_path, contract=True)
    assert proc.returncode != 0 and not list(tmp_path.glob("gathered.rank*"))
    lines = re.findall(r"^nccl_contract: rank (\d): all_gather input \(3, 4\) stride=\(1, 3\) is not contiguous",
                       proc.stderr, re.M)
    assert lines, proc.stderr[-2000:]
    assert "exitcode  : 97" in proc.stderr or "exitcode: 97" in proc.stderr
    assert time.perf_counter() - t0 < 60


def test_the_gloo_backend_alone_takes_what_nccl_refuses(tmp_path):
    """Why the contract exists: the same script without it runs to the end under gloo."""
    proc = run_transposed_gather(tmp_path, contract=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(tmp_path / f"gathered.rank{r}").read_text() for r in range(2)] == ["True", "True"]
