"""Shared helpers of the checkpoint benchmarks: states, timing, the disk's own limits, output.

Every benchmark repeats each measurement several times, rotating the order of the methods
from one repeat to the next (so none always runs on a warm or a cold machine), and reports
the median time of each method and the median of the *pairwise* ratios: ratio_i = the two
methods' results in repeat ``i``, so load from other processes on a shared machine cancels.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
# run_all.py --load points this at results-load/, so a loaded run never overwrites the quiet one
RESULTS = Path(os.environ.get("EVERTRAIN_BENCH_RESULTS", ROOT / "results"))
sys.path.insert(0, str(ROOT.parent / "src"))  # run from a checkout without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GB = 1e9
# SmolLM2-135M's shape (config.json of HuggingFaceTB/SmolLM2-135M), random init.
SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def workdir(name: str) -> Path:
    """A fresh scratch directory ``$EVERTRAIN_BENCH_DIR/<name>`` (default /tmp/evertrain-bench)."""
    base = Path(os.environ.get("EVERTRAIN_BENCH_DIR", "/tmp/evertrain-bench"))
    d = base / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def check_free_disk(path: Path, need_bytes: float) -> None:
    """Exit with a message when ``path``'s file system has less than ``need_bytes`` free."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    print(f"free disk at {path}: {free / GB:.1f} GB (need about {need_bytes / GB:.1f} GB)")
    if free < need_bytes:
        sys.exit(f"not enough free disk space at {path}; set EVERTRAIN_BENCH_DIR elsewhere")


# --------------------------------------------------------------------------- disk primitives


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and every directory: what makes a save durable."""
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(path: Path) -> None:
    """Drop ``path``'s files from the page cache (``POSIX_FADV_DONTNEED`` after an fsync), so
    the next read comes from the disk. Needs no root, unlike ``/proc/sys/vm/drop_caches``."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_RAW_CHUNK = 16 << 20


def raw_write(directory: Path, sizes: list[int], sources: list[memoryview]) -> float:
    """The disk's own limit for a checkpoint: write files of ``sizes`` bytes straight from
    memory with ``os.write`` (at most 16 MiB per call) under evertrain's fsync policy and
    with its overlap: into ``<directory>.tmp``, each file fsynced on a pool of 4 threads
    while the next is written, the directory fsynced, renamed to ``directory``, the parent
    fsynced. No hashing, no serialisation. Returns seconds.

    The bytes come from ``sources`` in turn (pass the state's own tensors, see
    :func:`state_buffers`): on this VM memory left untouched for a few seconds reads slowly
    the next time (the host reclaims it), so a separate buffer would handicap the baseline.
    """

    def sync(fd: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir()
    src, pos = 0, 0
    with ThreadPoolExecutor(4) as pool:
        pending = []
        for i, size in enumerate(sizes):
            fd = os.open(tmp / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            left = size
            while left:
                view = sources[src % len(sources)]
                chunk = view[pos : pos + min(left, _RAW_CHUNK)]
                if not chunk:
                    src, pos = src + 1, 0
                    continue
                n = os.write(fd, chunk)
                pos, left = pos + n, left - n
            pending.append(pool.submit(sync, fd))
        for f in pending:
            f.result()
    _fsync_dir(tmp)
    os.rename(tmp, directory)
    _fsync_dir(directory.parent)
    return time.perf_counter() - t0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_buffers(tree: Any) -> list[memoryview]:
    """The bytes of every tensor in a nested state, largest first (no copies)."""
    out = []

    def walk(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            if node.nelement():
                out.append(
                    memoryview(
                        node.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                    ).cast("B")
                )
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(tree)
    return sorted(out, key=len, reverse=True)


def raw_read(paths: list[Path]) -> float:
    """Read every file whole into fresh, uninitialised memory (one allocation per file, as a
    loader must; no zero-filling). Seconds."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buf = torch.empty(size, dtype=torch.uint8)
            view, got = memoryview(buf.numpy()).cast("B"), 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def touched_buffer(nbytes: int) -> memoryview:
    """``nbytes`` of pre-faulted memory (random-ish content: nothing compresses it away)."""
    t = torch.randint(
        0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return memoryview(t.numpy()).cast("B")


# --------------------------------------------------------------------------- states


def smollm2_model(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))


def fill_adamw_state(optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    """Give every parameter AdamW state as after a step (``step``, ``exp_avg``,
    ``exp_avg_sq``) without running a step of a 135M model on a CPU: same tensors, names,
    shapes and dtypes as torch's AdamW creates."""
    g = torch.Generator().manual_seed(seed)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                optimizer.state[p] = {
                    "step": torch.tensor(1.0),
                    "exp_avg": torch.randn(p.shape, generator=g, dtype=p.dtype),
                    "exp_avg_sq": torch.rand(p.shape, generator=g, dtype=p.dtype),
                }


def evertrain_states(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """The owners evertrain's trainer checkpoints, from its own state owners."""
    from evertrain.model_state import ModelState
    from evertrain.models import trainable_parameters
    from evertrain.optim import OptimizerState
    from evertrain.progress import Progress
    from evertrain.rng import RNGState

    identity = {"format": "bench", "model_type": "llama", "weights_hash": "0" * 32}
    return {
        "model": ModelState(model, identity).state_dict(),
        "optimizer": OptimizerState(optimizer, trainable_parameters(model)).state_dict(),
        "progress": Progress(global_step=1).state_dict(),
        "rng": RNGState().state_dict(),
    }


def lora_model(model: Any, r: int = 8) -> Any:
    """PEFT LoRA on q/k/v/o (evertrain's default targets for llama), base weights frozen."""
    from peft import LoraConfig, get_peft_model

    from evertrain.models.lora import default_target_modules

    cfg = LoraConfig(
        r=r, lora_alpha=16, lora_dropout=0.0, target_modules=default_target_modules("llama")
    )
    return get_peft_model(model, cfg)


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a nested state."""
    if isinstance(tree, torch.Tensor):
        return tree.nelement() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


# --------------------------------------------------------------------------- measuring


def rotated(methods: list[str], i: int) -> list[str]:
    k = i % len(methods)
    return methods[k:] + methods[:k]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pairwise(a: list[float], b: list[float]) -> float:
    """Median over repeats of a_i / b_i."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


@contextmanager
def timer() -> Iterator[Callable[[], float]]:
    t0 = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - t0
    end.append(time.perf_counter())


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg(),
    }


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def write_json(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps({"benchmark": name, "machine": machine(), **result}, indent=2) + "\n"
    )
    print(f"wrote {path}")
    return path


def train_run(cfg: dict[str, Any], work: Path, name: str) -> list[dict[str, Any]]:
    """Run ``evertrain train`` on ``cfg`` in a fresh process (``OMP_NUM_THREADS`` unset, so
    the config's threads apply) in a new run dir ``work/name``; its train records."""
    import subprocess
    import sys

    import yaml

    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run(
        [sys.executable, "-m", "evertrain", "train", str(path), "--run-dir", str(run)],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    return [
        rec
        for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if rec.get("kind") == "train"
    ]


def steady_tokens_per_s(records: list[dict[str, Any]]) -> float:
    """Tokens over seconds of steps 2..N (step 1 carries start-up and compilation)."""
    rest = [r for r in records if r["global_step"] >= 2]
    return sum(r["tokens"] for r in rest) / sum(r["seconds"] for r in rest)
