"""Test helper, run as a script (plain python or torchrun): the gradients that train_gpt.Trainer has
accumulated for its first step, before clipping and the optimizer, and the parameters after the
optimizers then step on them (Muon with its rows normalized, the default), saved by every rank to
argv[1] + ".rank<r>".

Every parameter is first set to seeded random values, so that no gradient is zero by construction
(the zero-initialised output projections would otherwise cut the gradient of every block matrix)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402


def main(out_path: str) -> None:
    args = train_gpt.Hyperparameters(int(os.environ.get("WORLD_SIZE", "1")))
    rt = train_gpt.Runtime(args.device)
    torch.manual_seed(args.seed)
    model = train_gpt.GPT(args).to(rt.device)
    model.recur_on = True  # the repeat on: the shared matrices take both passes' gradients, each pass its scalars'
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    loader = train_gpt.BatchLoader(train_gpt.find_shards(args.data_path, "train"), args, rt)
    trainer = train_gpt.Trainer(args, rt, model, loader, lambda *a, **k: None)
    loss = rt.all_reduce(trainer.accumulate(loader.next_step())) / rt.world_size
    grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}
    before = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    for opt in trainer.optimizers:
        opt.step()
    steps = {name: p.detach().cpu() - before[name] for name, p in model.named_parameters()}
    torch.save({"loss": float(loss), "grads": grads, "steps": steps, "world_size": rt.world_size,
                "accum": args.grad_accum_steps}, f"{out_path}.rank{rt.rank}")
    if rt.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
