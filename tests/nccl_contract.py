"""The rules ProcessGroupNCCL enforces on collectives, checked where the tests can only run gloo.

gloo, the CPU backend of the multi-process tests, forgives what NCCL rejects: it flattens a non-contiguous
tensor silently, so a Muon that all-gathered a transposed view passed every CPU test and would have stopped
the first 8-GPU run at its first step. This module wraps the `torch.distributed` collectives train_gpt.py
calls and raises on what NCCL would not take:

- every tensor dense (strided layout), contiguous, of a dtype NCCL has, on the backend's device type;
- all_reduce with an op NCCL has (no bitwise ops);
- all_gather_into_tensor: output of world_size x the input's elements, same dtype;
- all_gather (list form): world_size outputs, each of the input's shape and dtype;
- the object collectives with an output list of world_size entries where one is due.

It also records each rank's sequence of collectives (name, shapes, dtypes, op): NCCL needs every rank to
issue the same collectives in the same order with the same sizes, or it hangs; the tests compare the
records of all ranks.

Use it as the program torchrun starts, in front of the real script and its arguments:
    python -m torch.distributed.run --nproc_per_node=3 tests/nccl_contract.py train_gpt.py
A violation prints one `nccl_contract:` line and ends the process at once (exit code 97), so torchrun
tears the group down instead of the other ranks waiting out a timeout. Each rank writes its record to
`$NCCL_CONTRACT_LOG.rank<r>.json` (default prefix: nccl_contract in the working directory).
"""
from __future__ import annotations

import json
import os
import runpy
import sys

import torch
import torch.distributed as dist

# the dtypes ProcessGroupNCCL maps to an ncclDataType_t (bool and float8 travel as uint8; complex tensors are
# sent as their real pairs by torch.distributed)
NCCL_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
               torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.complex128}
NCCL_OPS = {dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.AVG}
CHECKED = ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast", "barrier", "all_gather_object",
           "gather_object")
EXIT_CODE = 97


class ContractViolation(Exception):
    pass


def check_tensor(what: str, t, device_type: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ContractViolation(f"{what} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided:
        raise ContractViolation(f"{what} is {t.layout}: NCCL takes dense tensors only")
    if not t.is_contiguous():
        raise ContractViolation(f"{what} {tuple(t.shape)} stride={t.stride()} is not contiguous: "
                                "NCCL rejects it ('Tensors must be contiguous')")
    if t.dtype not in NCCL_DTYPES:
        raise ContractViolation(f"{what} has dtype {t.dtype}, which NCCL has no type for")
    if t.device.type != device_type:
        raise ContractViolation(f"{what} is on {t.device}; this backend's collectives take {device_type} tensors")


def check_call(name: str, args: tuple, kwargs: dict, world: int, device_type: str) -> tuple:
    """Raise ContractViolation if NCCL would reject this call; else return its signature for the record."""
    def arg(i, key, default=None):
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name == "all_reduce":
        t, op = arg(0, "tensor"), arg(1, "op", dist.ReduceOp.SUM)
        check_tensor("all_reduce input", t, device_type)
        if op not in NCCL_OPS:
            raise ContractViolation(f"all_reduce op {op} is not one NCCL has")
        return name, [list(t.shape)], [str(t.dtype)], str(op)
    if name == "broadcast":
        t = arg(0, "tensor")
        check_tensor("broadcast tensor", t, device_type)
        return name, [list(t.shape)], [str(t.dtype)], str(arg(1, "src"))
    if name == "all_gather_into_tensor":
        out, inp = arg(0, "output_tensor"), arg(1, "input_tensor")
        check_tensor("all_gather_into_tensor output", out, device_type)
        check_tensor("all_gather_into_tensor input", inp, device_type)
        if out.dtype != inp.dtype:
            raise ContractViolation(f"all_gather_into_tensor output {out.dtype} != input {inp.dtype}")
        if out.numel() != world * inp.numel():
            raise ContractViolation(f"all_gather_into_tensor output has {out.numel()} elements, not world size "
                                    f"{world} x {inp.numel()}")
        return name, [list(out.shape), list(inp.shape)], [str(inp.dtype)], ""
    if name == "all_gather":
        outs, inp = arg(0, "tensor_list"), arg(1, "tensor")
        check_tensor("all_gather input", inp, device_type)
        if len(outs) != world:
            raise ContractViolation(f"all_gather has {len(outs)} outputs for world size {world}")
        for i, o in enumerate(outs):
            check_tensor(f"all_gather output {i}", o, device_type)
            if o.shape != inp.shape or o.dtype != inp.dtype:
                raise ContractViolation(f"all_gather output {i} is {tuple(o.shape)} {o.dtype}, the input "
                                        f"{tuple(inp.shape)} {inp.dtype}")
        return name, [list(inp.shape)], [str(inp.dtype)], ""
    if name == "all_gather_object":
        outs = arg(0, "object_list")
        if outs is None or len(outs) != world:
            raise ContractViolation(f"all_gather_object needs an output list of world size {world}")
        return name, [], [], ""
    if name == "gather_object":
        outs, dst = arg(1, "object_gather_list"), arg(2, "dst", 0)
        if dist.get_rank() == dst and (outs is None or len(outs) != world):
            raise ContractViolation(f"gather_object needs an output list of world size {world} on rank {dst}")
        return name, [], [], str(dst)
    if name == "barrier":
        return name, [], [], ""
    raise ContractViolation(f"{name} is not covered by the contract")


def install() -> list:
    """Wrap the collectives in torch.distributed; returns the list the calls are recorded in."""
    record = []
    for name in CHECKED:
        real = getattr(dist, name)

        def wrapped(*args, _name=name, _real=real, **kwargs):
            world = dist.get_world_size()
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
            try:
                record.append(check_call(_name, args, kwargs, world, device_type))
            except ContractViolation as e:
                print(f"nccl_contract: rank {dist.get_rank()}: {e}", file=sys.stderr, flush=True)
                os._exit(EXIT_CODE)
            return _real(*args, **kwargs)

        setattr(dist, name, wrapped)
    return record


def main() -> None:
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` would have it
    record = install()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        prefix = os.environ.get("NCCL_CONTRACT_LOG", "nccl_contract")
        with open(f"{prefix}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
