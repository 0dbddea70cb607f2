"""Your own loop on an FSDP2 (``fully_shard``) model, with evertrain's Checkpointer: each
rank saves only its shards, pickle-free, and a resume on another number of processes
reshards model and optimizer and continues the global sequence of examples.

    torchrun --nproc-per-node 2 examples/own_loop/fsdp.py --run-dir runs/fsdp --steps 12
    # killed or stopped? run it again, on 2 processes or on any other number

``--mode ddp`` (DistributedDataParallel) and ``--mode plain`` (one process) train the same
model on the same global batches, and resume each other's checkpoints: the merged state
of a sharded checkpoint is the state of an unsharded run.

The global batch is fixed (``GLOBAL_BATCH`` rows at global_step ``s``: rows
``s*GLOBAL_BATCH ...``, wrapping over the dataset), and split over whatever ranks there
are, so the sequence of examples depends on global_step only. The loss is the sum of the
rows' squared errors divided by the global batch (each rank scales its part by the world
size, since FSDP2 and DDP average gradients over ranks), so the gradient is that of the
whole batch on any world size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

import evertrain

GLOBAL_BATCH, ROWS, DIM = 12, 96, 24


class Net(torch.nn.Module):
    """Odd sizes on purpose: 37 and 13 rows do not divide by 2 or 3 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(DIM, 37)
        self.hidden = torch.nn.Linear(37, 37)
        self.out = torch.nn.Linear(37, 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(ROWS, DIM, generator=g), torch.randn(ROWS, 13, generator=g)


def rows_of_step(step: int, rank: int, world: int) -> list[int]:
    """The global rows of optimizer step ``step`` (0-based) this rank trains."""
    rows = [(step * GLOBAL_BATCH + i) % ROWS for i in range(GLOBAL_BATCH)]
    return rows[rank::world]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--mode", choices=["fsdp", "ddp", "plain"], default="fsdp")
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--kill-at", type=int, default=0, help="SIGKILL every rank after this step")
    ap.add_argument("--out", help="write the run's record (losses, rows, final weights) here")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU a rank)")
    ap.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 or args.mode == "fsdp":  # FSDP2 needs a process group, of 1 rank too
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank and world size
    model: torch.nn.Module = Net().to(device)
    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in (model.inp, model.hidden, model.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = (t.to(device) for t in dataset())
    # no dropout, so one RNG state serves every rank; rank_state lets a resume on another
    # world size give new ranks rank 0's (the data position is global_step itself)
    ckpt = evertrain.Checkpointer(
        args.run_dir,
        model=model,
        optimizer=opt,
        every_steps=args.save_every,
        keep_last=10,
        rank_state=lambda name, states: states[name],
        async_save=args.async_save,
    )
    record: dict[str, object] = {"losses": {}, "rows": {}}
    step = ckpt.resume()
    record["resumed_at"] = step
    if args.out and step > 0:
        record["moments_after_resume"] = _full_optimizer(model, opt)
    with ckpt:
        while step < args.steps:
            rows = rows_of_step(step, rank, world)
            pred = model(x[rows])
            loss_sum = (pred - y[rows]).pow(2).sum()
            (loss_sum * world / GLOBAL_BATCH).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total = loss_sum.detach().clone()
            if dist.is_initialized():
                dist.all_reduce(total)
            step += 1
            record["losses"][step] = float(total) / GLOBAL_BATCH  # type: ignore[index]
            record["rows"][step] = _all_rows(rows, world)  # type: ignore[index]
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            ckpt.step(step, {"loss": record["losses"][step]}, save=step == args.steps)  # type: ignore[index]
        final = _full_model(model)
    if args.out and rank == 0:
        from safetensors.torch import save_file

        save_file(final, f"{args.out}.weights.safetensors")
        moments = record.pop("moments_after_resume", None)
        if moments:
            save_file(moments, f"{args.out}.moments.safetensors")
        Path(args.out).write_text(json.dumps(record))
    if dist.is_initialized():
        # every rank done with the group before any tears it down; the sharded model's
        # hooks and the checkpointer go first (else gloo may abort at exit)
        dist.barrier()
        del ckpt, model, opt
        gc.collect()
        dist.destroy_process_group()


def _all_rows(rows: list[int], world: int) -> list[int]:
    if world == 1:
        return sorted(rows)
    out: list[list[int]] = [[] for _ in range(world)]
    dist.all_gather_object(out, rows)  # a test aid on plain lists, not checkpoint content
    return sorted(r for part in out for r in part)


def _full_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone().contiguous() for k, v in full.items()}


def _full_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return {
        f"{name}/{key}": v.detach().cpu().clone().contiguous()
        for name, s in osd["state"].items()
        for key, v in s.items()
        if isinstance(v, torch.Tensor)
    }


if __name__ == "__main__":
    main()
