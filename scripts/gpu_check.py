"""The checks CPU CI cannot reach, on a machine with CUDA GPUs (run by scripts/gpu-check.sh).

One line per check (``PASS name: details`` / ``FAIL name: error`` / ``SKIP name: why``); the
exit status is 1 if any check failed. Without CUDA every check is skipped (exit 0), unless
``--cpu`` asks to run the device-independent ones on the CPU (a dry run of this script).

Checks: bf16 autocast; CUDA RNG state round trip; pinned-memory staging of an async save;
FSDP2 on one GPU (a 1-rank NCCL group) with a sharded checkpoint resumed exactly; NCCL FSDP2
across every GPU with a SIGKILL mid-run resumed bit-exactly (several GPUs); torch.compile;
a kill -9 resume of `evertrain train` bit-exact with deterministic algorithms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"
RESULTS: list[tuple[str, str, str]] = []


def check(name: str, needs_cuda: bool = True, min_gpus: int = 1) -> Callable[..., None]:
    def wrap(fn: Callable[[Path], str]) -> Callable[..., None]:
        def run() -> None:
            if needs_cuda and DEVICE != "cuda":
                RESULTS.append(("SKIP", name, "needs CUDA"))
                return
            if DEVICE == "cuda" and torch.cuda.device_count() < min_gpus:
                RESULTS.append(("SKIP", name, f"needs {min_gpus} GPUs"))
                return
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    RESULTS.append(("PASS", name, fn(Path(tmp))))
                except Exception as e:  # noqa: BLE001 - every failure becomes one line
                    detail = traceback.format_exc().strip().splitlines()[-1]
                    RESULTS.append(("FAIL", name, f"{type(e).__name__}: {detail}"))

        CHECKS.append(run)
        return run

    return wrap


CHECKS: list[Callable[[], None]] = []


def tiny_config(tmp: Path, **train: object) -> Path:
    import yaml

    data = ROOT / "examples" / "data" / "tiny.jsonl"
    cfg = {
        "seed": 1234,
        "model": {"source": "tiny", "dropout": 0.1, "num_threads": 1},
        "data": {"files": [str(data)], "seq_len": 64, "val_fraction": 0.05},
        "train": {
            "micro_batch_size": 4,
            "grad_accum_steps": 2,
            "max_steps": 12,
            "lr": 2e-3,
            "schedule": {"name": "cosine", "warmup_steps": 2},
            "eval_every_steps": 6,
            "device": DEVICE,
            **train,
        },
        "checkpoint": {"every_steps": 3, "keep_last": 10},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("EVERTRAIN_FAULT")}
    out.update(PYTHONHASHSEED="0", HF_HUB_OFFLINE="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    out.update(**extra)  # evertrain itself turns deterministic algorithms on for CUDA
    return out


def evertrain(args: list[str], nproc: int = 1, **extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "evertrain", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(nproc), "-m", "evertrain", *args]
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=1800)


def final_states(run: Path) -> dict[str, object]:
    from evertrain.checkpoint import CheckpointManager, KeepLast, read_checkpoint
    from evertrain.sharded import merge_sharded

    info = CheckpointManager(run / "checkpoints", KeepLast(1)).latest_valid()
    assert info is not None, f"no valid checkpoint in {run}"
    states = read_checkpoint(info.path).states
    merge_sharded(states)
    return {k: v for k, v in states.items() if k in ("model", "optimizer", "scheduler")}


def same(a: object, b: object) -> None:
    """The same structure, every tensor equal (dtype included: rtol = atol = 0), every
    other leaf equal."""
    from torch.utils._pytree import tree_flatten

    (la, sa), (lb, sb) = tree_flatten(a), tree_flatten(b)
    assert sa == sb, "different structure"
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        else:
            assert x == y, f"{x!r} != {y!r}"


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {
        r["global_step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"
    }


def kill_and_resume(tmp: Path, nproc: int, **train: object) -> str:
    """A straight run vs one SIGKILLed mid-step 7 (fault point) and resumed: bit-exact."""
    cfg = tiny_config(tmp, **train)
    a, b = tmp / "a", tmp / "b"
    p = evertrain(["train", str(cfg), "--run-dir", str(a)], nproc)
    assert p.returncode == 0, p.stderr[-2000:]
    p = evertrain(["train", str(cfg), "--run-dir", str(b)], nproc, EVERTRAIN_FAULT="micro@7:1")
    assert p.returncode != 0, "the fault did not fire"
    p = evertrain(["train", str(cfg), "--run-dir", str(b)], nproc)
    assert p.returncode == 0, p.stderr[-2000:]
    assert losses(a) == losses(b), "losses differ"
    same(final_states(a), final_states(b))
    return f"{len(losses(a))} steps, killed at 7, resumed: every tensor equal, losses equal"


@check("bf16 autocast", needs_cuda=False)
def bf16_autocast(tmp: Path) -> str:
    from evertrain.config import ModelConfig
    from evertrain.models import load_model

    model = load_model(ModelConfig(source="tiny")).model.to(DEVICE)
    x = torch.randint(0, 200, (2, 32), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    return f"loss {float(out.loss.detach()):.4f} in bf16, gradients finite"


@check("CUDA RNG state save/restore")
def cuda_rng(tmp: Path) -> str:
    from evertrain.rng import RNGState

    owner = RNGState()
    state = owner.state_dict()
    first = torch.rand(4, device=DEVICE)
    owner.load_state_dict(state)
    again = torch.rand(4, device=DEVICE)
    assert torch.equal(first, again)
    return "the same CUDA draws after restoring the saved state"


@check("pinned staging of an async save", needs_cuda=False)
def pinned_async(tmp: Path) -> str:
    import evertrain
    from evertrain.checkpoint import read_checkpoint

    model = torch.nn.Linear(256, 256).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 256, device=DEVICE)).sum().backward()
    opt.step()
    with evertrain.Checkpointer(tmp, model=model, optimizer=opt, async_save=True) as ckpt:
        ckpt.start_fresh()
        ckpt.step(1, {"loss": 0.0}, save=True)
        ckpt.wait()
    saved = read_checkpoint(tmp / "checkpoints" / "step-00000001").states["model"]["weights"]
    assert torch.equal(saved["weight"], model.weight.detach().cpu())
    return "background save of CUDA tensors committed and equal"


@check("FSDP2 on one GPU (1 rank), kill -9 resume", needs_cuda=False)
def fsdp_one_gpu(tmp: Path) -> str:
    from safetensors.torch import load_file

    script = ROOT / "examples" / "own_loop" / "fsdp.py"

    def run(name: str, *more: str) -> int:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", "1", str(script), "--run-dir", str(tmp / name)]
        cmd += ["--steps", "6", "--device", DEVICE, "--out", str(tmp / f"{name}.json"), *more]
        p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
        return p.returncode

    assert run("a") == 0 and run("b", "--kill-at", "4") != 0 and run("b") == 0
    a, b = (load_file(tmp / f"{n}.json.weights.safetensors") for n in "ab")
    same(a, b)
    return "6 steps, killed after step 4, resumed from 3: weights equal"


@check("NCCL FSDP2 across GPUs, kill -9 resume", min_gpus=2)
def fsdp_nccl(tmp: Path) -> str:
    return kill_and_resume(tmp, torch.cuda.device_count(), parallel="fsdp")


@check("torch.compile")
def compiled(tmp: Path) -> str:
    cfg = tiny_config(tmp, max_steps=4)
    text = cfg.read_text().replace("num_threads: 1", "num_threads: 1\n  compile: true")
    cfg.write_text(text)
    p = evertrain(["train", str(cfg), "--run-dir", str(tmp / "run")])
    assert p.returncode == 0, p.stderr[-2000:]
    return "4 steps of a compiled model"


@check("one host sync per optimizer step (set_sync_debug_mode)")
def host_syncs(tmp: Path) -> str:
    import warnings

    from evertrain.config import load_config
    from evertrain.recipe import build_trainer

    cfg = load_config(tiny_config(tmp, grad_accum_steps=4, max_steps=6))
    trainer = build_trainer(cfg, tmp / "run")
    try:
        trainer.start_fresh()
        batches = trainer.batches()
        trainer.train_step(batches)  # warm-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(2):
                    trainer.train_step(batches)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= 2, [str(w.message) for w in syncs]
        return f"{len(syncs)} synchronizing call(s) in 2 steps of 4 micro-batches"
    finally:
        trainer.close()


@check("kill -9 resume, deterministic algorithms", needs_cuda=False)
def deterministic_resume(tmp: Path) -> str:
    return kill_and_resume(tmp, 1)


def main() -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run of the device-free checks")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        if not args.cpu:
            print("SKIP all: no CUDA device (CPU CI runs the test suite instead)")
            return 0
        DEVICE = "cpu"
    for run in CHECKS:
        run()
    for status, name, detail in RESULTS:
        print(f"{status} {name}: {detail}", flush=True)
    return 1 if any(s == "FAIL" for s, _, _ in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
