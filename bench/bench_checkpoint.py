"""Benchmarks 1, 2, 3 and 6: save throughput, load throughput, stall per checkpoint, hashing.

State: a random-init ``LlamaForCausalLM`` with SmolLM2-135M's shape (134.5M parameters,
fp32) and AdamW moments: ~1.6 GB for full fine-tuning; and a LoRA state (r=8 on q/k/v/o,
adapter and its moments only). evertrain saves the owners its trainer checkpoints (model,
optimizer, progress, rng) through ``CheckpointManager``.

Peers, all made durable the same way (every file fsynced, then the directory):
- ``disk``: files of the same sizes written from the state's own tensor memory with
  ``os.write`` (16 MiB per call) under evertrain's fsync policy and overlap (see
  ``common.raw_write``): the disk's own limit.
- ``torch.save``: the same state dicts pickled into one file.
- ``hf_trainer``: ``transformers.Trainer._save_checkpoint`` (model.safetensors via
  save_pretrained, optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, ...) of
  the same model and optimizer; it does not fsync by itself, so ``hf_trainer`` adds an
  fsync of its files and ``hf_trainer_nofsync`` is reported beside it.

Usage: ``python bench/bench_checkpoint.py [--repeats 5] [--only save,lora,load,stall,hash]``
"""

from __future__ import annotations

import argparse
import gc
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import xxhash
from common import (
    GB,
    check_free_disk,
    dir_bytes,
    evertrain_states,
    evict,
    fill_adamw_state,
    fsync_tree,
    lora_model,
    median,
    pairwise,
    print_table,
    raw_read,
    raw_write,
    rotated,
    smollm2_model,
    state_buffers,
    tensor_bytes,
    touched_buffer,
    workdir,
    write_json,
)

from evertrain.checkpoint import CheckpointManager, KeepLast, read_checkpoint


def hf_trainer(model: Any, out: Path) -> Any:
    """A Hugging Face Trainer around ``model`` with its default AdamW (torch) and scheduler."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_steps=10,
        disable_tqdm=True,
        save_total_limit=None,
    )
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    fill_adamw_state(trainer.optimizer)
    return trainer


def _summary(step: int) -> dict[str, Any]:
    return {"global_step": step, "metrics": {}}


# --------------------------------------------------------------------------- 1. save


def bench_save(case: str, repeats: int) -> dict[str, Any]:
    work = workdir(f"save-{case}")
    model = smollm2_model()
    if case == "lora":
        model = lora_model(model)
    trainer = hf_trainer(model, work / "hf")
    states = evertrain_states(model, trainer.optimizer)
    state_bytes = tensor_bytes(states)
    print(f"\n[save/{case}] state: {state_bytes / GB:.3f} GB of tensors")
    manager = CheckpointManager(work / "evertrain", KeepLast(1000))
    # One untimed save: its file sizes drive the raw-disk baseline.
    probe = manager.save(0, states, _summary(0))
    sizes = sorted((p.stat().st_size for p in probe.iterdir()), reverse=True)
    ckpt_bytes = sum(sizes)
    shutil.rmtree(probe)
    sources = state_buffers(states)

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    nbytes: dict[str, int] = {}

    def run(method: str, step: int) -> None:
        gc.collect()
        target: Path
        if method == "evertrain":
            t0 = time.perf_counter()
            target = manager.save(step, states, _summary(step))
            times[method].append(time.perf_counter() - t0)
        elif method == "disk":
            target = work / f"disk-{step}"
            times[method].append(raw_write(target, sizes, sources))
        elif method == "torch.save":
            target = work / f"torch-{step}"
            t0 = time.perf_counter()
            target.mkdir()
            torch.save(states, target / "state.pt")
            fsync_tree(target)
            times[method].append(time.perf_counter() - t0)
        else:  # hf_trainer
            trainer.state.global_step = step
            t0 = time.perf_counter()
            trainer._save_checkpoint(trainer.model, trial=None)
            t1 = time.perf_counter()
            target = work / "hf" / f"checkpoint-{step}"
            fsync_tree(target)
            times["hf_trainer_nofsync"].append(t1 - t0)
            times[method].append(time.perf_counter() - t0)
        nbytes[method] = dir_bytes(target)
        shutil.rmtree(target)

    for i in range(repeats):
        for method in rotated(["evertrain", "disk", "torch.save", "hf_trainer"], i):
            run(method, i + 1)
    nbytes["hf_trainer_nofsync"] = nbytes["hf_trainer"]
    rows, result = [], {}
    for m in METHODS:
        t = median(times[m])
        result[m] = {
            "median_s": t,
            "runs_s": times[m],
            "bytes": nbytes[m],
            "bytes_per_s": nbytes[m] / t,
        }
        rows.append(
            [m, t, nbytes[m] / GB, nbytes[m] / t / GB, pairwise(times[m], times["evertrain"])]
        )
    print_table(
        f"1. save, {case} ({repeats} runs, median; ratio = peer time / evertrain time, pairwise)",
        ["method", "seconds", "GB", "GB/s", "x evertrain time"],
        rows,
    )
    ratios = {
        # throughput of evertrain relative to the disk writing the same bytes
        "evertrain_vs_disk_throughput": pairwise(times["disk"], times["evertrain"]),
        "speedup_vs_torch_save": pairwise(times["torch.save"], times["evertrain"]),
        "speedup_vs_hf_trainer": pairwise(times["hf_trainer"], times["evertrain"]),
        "speedup_vs_hf_trainer_nofsync": pairwise(times["hf_trainer_nofsync"], times["evertrain"]),
    }
    out: dict[str, Any] = {
        "case": case,
        "repeats": repeats,
        "state_tensor_bytes": state_bytes,
        "checkpoint_bytes": ckpt_bytes,
        "methods": result,
        "ratios": ratios,
    }
    if case == "lora":
        adapter = tensor_bytes(states["model"])
        moments = sum(
            tensor_bytes(s.get("exp_avg")) + tensor_bytes(s.get("exp_avg_sq"))
            for s in states["optimizer"]["state"].values()
        )
        out["lora"] = {
            "adapter_bytes": adapter,
            "moments_bytes": moments,
            "size_ratio": ckpt_bytes / (adapter + moments),
        }
        print(
            f"LoRA checkpoint {ckpt_bytes} B = {out['lora']['size_ratio']:.4f} x adapter "
            f"({adapter} B) + moments ({moments} B)"
        )
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    shutil.rmtree(work)
    return out


METHODS = ["evertrain", "disk", "torch.save", "hf_trainer", "hf_trainer_nofsync"]


# --------------------------------------------------------------------------- 2. load


def bench_load(repeats: int) -> dict[str, Any]:
    work = workdir("load")
    model = smollm2_model()
    opt = torch.optim.AdamW(model.parameters())
    fill_adamw_state(opt)
    states = evertrain_states(model, opt)
    ckpt = CheckpointManager(work / "ckpts", KeepLast(10)).save(1, states, _summary(1))
    pt = work / "state.pt"
    torch.save(states, pt)
    fsync_tree(work)
    del states, model, opt
    gc.collect()
    files = sorted(p for p in ckpt.iterdir())
    nbytes = {
        "evertrain": dir_bytes(ckpt),
        "disk": dir_bytes(ckpt),
        "torch.load": pt.stat().st_size,
    }
    ops = {
        "evertrain": lambda: read_checkpoint(ckpt),
        "disk": lambda: raw_read(files),
        "torch.load": lambda: torch.load(pt, weights_only=True),
    }
    result: dict[str, Any] = {"repeats": repeats, "bytes": nbytes}
    for cache in ("cold", "warm"):
        times: dict[str, list[float]] = {m: [] for m in ops}
        for i in range(repeats):
            for m in rotated(list(ops), i):
                if cache == "cold":
                    evict(work)
                else:
                    raw_read(files if m != "torch.load" else [pt])  # into the page cache
                gc.collect()
                t0 = time.perf_counter()
                loaded = ops[m]()
                times[m].append(time.perf_counter() - t0)
                del loaded
        rows = [
            [
                m,
                median(times[m]),
                nbytes[m] / median(times[m]) / GB,
                pairwise(times[m], times["evertrain"]),
            ]
            for m in ops
        ]
        print_table(
            f"2. load, {cache} page cache ({repeats} runs; "
            "ratio = time / evertrain time, pairwise)",
            ["method", "seconds", "GB/s", "x evertrain time"],
            rows,
        )
        result[cache] = {
            "methods": {m: {"median_s": median(times[m]), "runs_s": times[m]} for m in ops},
            "ratios": {
                "evertrain_vs_disk_read_throughput": pairwise(times["disk"], times["evertrain"]),
                "speedup_vs_torch_load": pairwise(times["torch.load"], times["evertrain"]),
            },
        }
        for k, v in result[cache]["ratios"].items():
            print(f"  {k}: {v:.3f}")
    result["profile_warm"] = _profile_load(ckpt)
    shutil.rmtree(work)
    return result


def _profile_load(ckpt: Path) -> dict[str, float]:
    """Where a warm load's time goes: reading bytes, hashing, safetensors parsing."""
    import safetensors.torch

    files = [p for p in ckpt.iterdir() if p.suffix == ".safetensors"]
    blobs = []
    t0 = time.perf_counter()
    for p in files:
        blobs.append(p.read_bytes())
    t1 = time.perf_counter()
    for b in blobs:
        xxhash.xxh3_128(b).hexdigest()
    t2 = time.perf_counter()
    for b in blobs:
        safetensors.torch.load(b)
    t3 = time.perf_counter()
    prof = {"read_s": t1 - t0, "hash_s": t2 - t1, "safetensors_load_s": t3 - t2}
    print(f"  warm load profile (safetensors files): {prof}")
    return prof


# --------------------------------------------------------------------------- 3. stall


def bench_stall(repeats: int) -> dict[str, Any]:
    work = workdir("stall")
    model = smollm2_model()
    opt = torch.optim.AdamW(model.parameters())
    fill_adamw_state(opt)
    states = evertrain_states(model, opt)
    tensors = _tensors(states)
    state_bytes = sum(t.nelement() * t.element_size() for t in tensors)
    manager = CheckpointManager(work / "ckpts", KeepLast(2))
    prealloc = [torch.empty_like(t) for t in tensors]
    t0 = time.perf_counter()
    manager.save_async(0, states, _summary(0))  # allocates the staging buffer
    first_stall = time.perf_counter() - t0
    manager.wait()
    times: dict[str, list[float]] = {m: [] for m in ("clone", "copy_into", "async", "sync")}
    step = 0
    for i in range(repeats):
        for m in rotated(list(times), i):
            step += 1
            gc.collect()
            t0 = time.perf_counter()
            if m == "clone":
                copy = [t.clone() for t in tensors]
                times[m].append(time.perf_counter() - t0)
                del copy
            elif m == "copy_into":
                for dst, src in zip(prealloc, tensors, strict=True):
                    dst.copy_(src)
                times[m].append(time.perf_counter() - t0)
            elif m == "async":
                manager.save_async(step, states, _summary(step))
                times[m].append(time.perf_counter() - t0)
                manager.wait()  # not part of the stall: the training step would run now
            else:
                manager.save(step, states, _summary(step))
                times[m].append(time.perf_counter() - t0)
    stats = manager.take_stats()
    async_write = median([s.write_s for s in stats if s.mode == "async"])
    rows = [
        [
            m,
            median(times[m]),
            state_bytes / median(times[m]) / GB,
            pairwise(times["async"], times[m]),
        ]
        for m in times
    ]
    print_table(
        f"3. stall per checkpoint, full fine-tuning ({state_bytes / GB:.2f} GB of tensors, "
        f"{repeats} runs; ratio = async stall / method time, pairwise)",
        ["method", "seconds", "GB/s", "async / this"],
        rows,
    )
    ratios = {
        "async_vs_clone": pairwise(times["async"], times["clone"]),
        "async_vs_copy_into_preallocated": pairwise(times["async"], times["copy_into"]),
        "async_vs_sync": pairwise(times["async"], times["sync"]),
    }
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    print(
        f"  first async save (allocates the staging buffer): {first_stall:.3f} s; "
        f"background write of an async save: {async_write:.3f} s"
    )
    shutil.rmtree(work)
    return {
        "repeats": repeats,
        "state_tensor_bytes": state_bytes,
        "methods": {m: {"median_s": median(v), "runs_s": v} for m, v in times.items()},
        "first_async_stall_s": first_stall,
        "async_background_write_s": async_write,
        "ratios": ratios,
    }


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, list):
        return [t for v in tree for t in _tensors(v)]
    return []


# --------------------------------------------------------------------------- 6. hash


def bench_hash(repeats: int, nbytes: int = 1 << 30) -> dict[str, Any]:
    work = workdir("hash")
    buf = touched_buffer(nbytes)
    chunk = 16 << 20
    times: dict[str, list[float]] = {"xxh3_128": [], "disk_write": [], "disk_read": []}
    for i in range(repeats):
        for m in rotated(list(times), i):
            if m == "xxh3_128":
                t0 = time.perf_counter()
                h = xxhash.xxh3_128()
                for off in range(0, nbytes, chunk):
                    h.update(buf[off : off + chunk])
                h.hexdigest()
                times[m].append(time.perf_counter() - t0)
            elif m == "disk_write":
                shutil.rmtree(work / "w", ignore_errors=True)
                times[m].append(raw_write(work / "w", [nbytes], [buf]))
            else:
                if not (work / "w").exists():
                    raw_write(work / "w", [nbytes], [buf])
                evict(work / "w")
                times[m].append(raw_read([work / "w" / "f0"]))
    rows = [
        [m, median(v), nbytes / median(v) / GB, pairwise(times[m], times["xxh3_128"])]
        for m, v in times.items()
    ]
    print_table(
        f"6. hash vs disk, {nbytes / GB:.2f} GB ({repeats} runs; "
        "ratio = time / hash time, pairwise)",
        ["operation", "seconds", "GB/s", "x hash time"],
        rows,
    )
    ratios = {
        "hash_vs_disk_write_throughput": pairwise(times["disk_write"], times["xxh3_128"]),
        "hash_vs_disk_read_throughput": pairwise(times["disk_read"], times["xxh3_128"]),
    }
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")
    shutil.rmtree(work)
    return {
        "bytes": nbytes,
        "methods": {m: {"median_s": median(v), "runs_s": v} for m, v in times.items()},
        "ratios": ratios,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="save,lora,load,stall,hash")
    a = p.parse_args()
    only = set(a.only.split(","))
    check_free_disk(workdir("probe"), 8 * GB)
    if "save" in only:
        write_json("save_full", bench_save("full", a.repeats))
    if "lora" in only:
        write_json("save_lora", bench_save("lora", max(a.repeats, 9)))
    if "load" in only:
        write_json("load", bench_load(a.repeats))
    if "stall" in only:
        write_json("stall", bench_stall(a.repeats))
    if "hash" in only:
        write_json("hash", bench_hash(a.repeats))


if __name__ == "__main__":
    main()
