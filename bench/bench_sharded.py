"""Sharded (FSDP2) checkpoints: evertrain's per-rank safetensors against
``torch.distributed.checkpoint`` (DCP) on the same ranks, state and disk.

- **save** (2 ranks): a Checkpointer save of model + AdamW state vs ``dcp.save`` of
  ``get_model_state_dict`` + ``get_optimizer_state_dict`` (DCP's FileSystemWriter, files
  fsynced), and each rank's raw write of its own bytes (``os.write`` + fsync: the disk's
  limit). Targets: evertrain >= 1.2x DCP's speed, >= 0.8x the raw write's throughput.
- **load with resharding 2 -> 3**: a Checkpointer resume on 3 ranks of the 2-rank
  checkpoint vs ``dcp.load`` + ``set_*_state_dict`` of DCP's 2-rank checkpoint on 3 ranks.

Times are the slowest rank's (the save or load is done when every rank is), repeated with
the methods' order rotated; ratios are medians of pairwise ratios (common.py). Run:
``.venv/bin/python bench/bench_sharded.py [--layers 30] [--repeats 3]``; results in
``bench/results/sharded.json``. The model is SmolLM2-135M's shape (random init).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402


def build(layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**common.SMOLLM2_SHAPE, "num_hidden_layers": layers})
    model = LlamaForCausalLM(cfg)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(fn: Any) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - t0)


def local_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[memoryview]:
    from torch.distributed.tensor import DTensor

    out = []
    tensors = list(model.parameters()) + [
        v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.numel():
            out.append(memoryview(local.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return out


def phase_save(work: Path, layers: int, repeats: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    import evertrain

    model, opt = build(layers)
    rank = dist.get_rank()
    sources = local_bytes(model, opt)
    nbytes = sum(len(s) for s in sources)
    times: dict[str, list[float]] = {"evertrain": [], "dcp": [], "raw": []}

    def ours(i: int) -> None:
        run = work / f"ev{i}"
        with evertrain.Checkpointer(
            run, model=model, optimizer=opt, keep_last=1, rank_state=lambda n, s: s[n]
        ) as ck:
            ck.start_fresh()
            ck.progress.global_step = 1
            ck.save()

    def theirs(i: int) -> None:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=str(work / f"dcp{i}"))

    def raw(i: int) -> None:
        d = work / f"raw{i}" / f"rank{rank}"
        d.parent.mkdir(parents=True, exist_ok=True)
        common.raw_write(d, [len(s) for s in sources], sources)

    methods = {"evertrain": ours, "dcp": theirs, "raw": raw}
    for i in range(repeats):
        for name in common.rotated(list(methods), i):
            times[name].append(timed(lambda name=name: methods[name](i)))
    total = torch.tensor([nbytes], dtype=torch.float64)
    dist.all_reduce(total)
    return {"times": times, "bytes_all_ranks": int(total), "bytes_rank0": nbytes}


def phase_load(work: Path, layers: int, repeats: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    import evertrain

    times: dict[str, list[float]] = {"evertrain": [], "dcp": []}

    def ours(i: int) -> None:
        model, opt = build(layers)
        with evertrain.Checkpointer(
            work / "ev0", model=model, optimizer=opt, keep_last=1, rank_state=lambda n, s: s[n]
        ) as ck:
            dist.barrier()
            t0 = time.perf_counter()
            ck.resume()
            times["evertrain"].append(slowest(time.perf_counter() - t0))

    def theirs(i: int) -> None:
        model, opt = build(layers)
        dist.barrier()
        t0 = time.perf_counter()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(work / "dcp0"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        times["dcp"].append(slowest(time.perf_counter() - t0))

    methods = {"evertrain": ours, "dcp": theirs}
    for i in range(repeats):
        for name in common.rotated(list(methods), i):
            methods[name](i)
    return {"times": times}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    work = Path(args.work)
    out = (phase_save if args.phase == "save" else phase_load)(work, args.layers, args.repeats)
    if dist.get_rank() == 0:
        (work / f"{args.phase}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def launch(nproc: int, phase: str, work: Path, layers: int, repeats: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += [str(nproc), __file__, "--worker", "--phase", phase, "--work", str(work)]
    cmd += ["--layers", str(layers), "--repeats", str(repeats)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result: dict[str, Any] = json.loads((work / f"{phase}.json").read_text())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--phase", choices=["save", "load"])
    p.add_argument("--work")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    work = common.workdir("sharded")
    save = launch(2, "save", work, args.layers, args.repeats)
    load = launch(3, "load", work, args.layers, args.repeats)
    st, lt = save["times"], load["times"]
    per_rank_bytes = save["bytes_rank0"]
    ratios = {
        "save_speedup_vs_dcp": common.pairwise(st["dcp"], st["evertrain"]),
        "save_throughput_vs_raw_write": common.pairwise(st["raw"], st["evertrain"]),
        "load_2to3_speedup_vs_dcp": common.pairwise(lt["dcp"], lt["evertrain"]),
    }
    result = {
        "machine": common.machine(),
        "layers": args.layers,
        "bytes_all_ranks": save["bytes_all_ranks"],
        "bytes_per_rank": per_rank_bytes,
        "save_seconds": {k: common.median(v) for k, v in st.items()},
        "load_2to3_seconds": {k: common.median(v) for k, v in lt.items()},
        "ratios": ratios,
    }
    common.RESULTS.mkdir(exist_ok=True)
    (common.RESULTS / "sharded.json").write_text(json.dumps(result, indent=1) + "\n")
    common.print_table(
        f"sharded FSDP2 checkpoint, {save['bytes_all_ranks'] / common.GB:.2f} GB on 2 ranks",
        ["ratio", "value", "target"],
        [
            ["save speed-up vs DCP", ratios["save_speedup_vs_dcp"], ">= 1.2"],
            ["save throughput / raw write", ratios["save_throughput_vs_raw_write"], ">= 0.8"],
            ["load 2->3 speed-up vs DCP", ratios["load_2to3_speedup_vs_dcp"], ""],
        ],
    )


if __name__ == "__main__":
    main()
