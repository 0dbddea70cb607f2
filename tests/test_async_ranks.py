"""Asynchronous saves with several processes (issue 12: "async save too"): each rank copies
its states to host memory and returns; the write and the commit run in background threads
that agree over a second process group, while the training threads keep running their own
collectives. A failure on any rank commits nothing and is raised on every rank, by the next
wait or save; the checkpoint holds the states as they were when save returned."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evertrain.checkpoint import (
    CheckpointManager,
    CheckpointWriteError,
    InsufficientDiskSpaceError,
    KeepLast,
    read_checkpoint,
    verify_checkpoint,
)
from evertrain.checkpoint.ranks import rank_problems, save_ranked
from evertrain.distributed import Group


def _states(rank: int, step: int) -> dict[str, Any]:
    states: dict[str, Any] = {"rng": {"version": 1, "torch_cpu": torch.full((5,), rank + step)}}
    if rank == 0:
        states["model"] = {"version": 1, "w": torch.arange(6.0) * step}
    return states


def _worker(rank: int, root: str) -> None:
    """Rank ``rank`` of 2 saves steps 1..7 asynchronously and records what each raised:
    1 ok; 2 rank 1's state is invalid; 3 rank 0 finds too little disk; 4 ok; 5 rank 1's
    write fails with ENOSPC, not waited for, so step 6's save raises it; 7 ok."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    group = Group(world_size=2, rank=rank, backend="gloo")
    side = group.side_group()
    manager = CheckpointManager(Path(root) / "checkpoints", KeepLast(10))
    import evertrain.checkpoint.ranks as ranks

    real_write = ranks.write_owner_files
    outcomes: dict[str, Any] = {}
    for step in range(1, 8):
        states = _states(rank, step)
        if step == 2 and rank == 1:
            states["rng"]["bad"] = (1, 2)  # tuples are not storable
        manager.min_free_bytes = 1 << 62 if step == 3 and rank == 0 else 0
        if step == 5 and rank == 1:

            def enospc(*a: Any, **k: Any) -> Any:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "rng_rank1.safetensors")

            ranks.write_owner_files = enospc  # type: ignore[assignment]
        else:
            ranks.write_owner_files = real_write
        try:
            save_ranked(manager, group, step, states, {"global_step": step}, async_group=side)
            # the training thread goes on: changes the states in place and runs collectives
            # on its own group while the background threads commit over theirs
            for owner in states.values():
                for v in owner.values():
                    if isinstance(v, torch.Tensor):
                        v.fill_(-1.0)
            total = group.sum_tensor(torch.ones(3))
            for _ in range(20):
                total = group.sum_tensor(total / 2)
            assert torch.equal(total, torch.full((3,), 2.0)), total
            if step != 5:
                manager.wait()
            outcomes[str(step)] = "ok"
        except (CheckpointWriteError, InsufficientDiskSpaceError) as e:
            outcomes[str(step)] = f"{type(e).__name__}: {e}"
    manager.close()
    Path(root, f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.destroy_process_group()


def test_async_multi_rank_saves_commit_together_or_not_at_all(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["1"] == r["4"] == r["7"] == "ok", r
        assert r["2"].startswith("CheckpointWriteError") and "rank 1" in r["2"], r["2"]
        assert "tuple" in r["2"]
        assert r["3"].startswith("InsufficientDiskSpaceError"), r["3"]
        assert r["5"] == "ok"  # returned at once; the failure came with the next save
        assert r["6"].startswith("CheckpointWriteError") and "step 5" in r["6"], r["6"]
    assert "No space left" in r0["6"] and "rank 1" in r0["6"]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f"step-{s:08d}" for s in (1, 4, 7)]
    for step in (1, 4, 7):
        ck = read_checkpoint(root / f"step-{step:08d}")
        assert verify_checkpoint(ck.path) == [] and rank_problems(ck.manifest) == []
        # what the states held when save returned, not what the loop wrote after it
        assert torch.equal(ck.states["model"]["w"], torch.arange(6.0) * step)
        assert torch.equal(ck.states["rng"]["torch_cpu"], torch.full((5,), float(step)))
        assert torch.equal(ck.states["rng_rank1"]["torch_cpu"], torch.full((5,), 1.0 + step))
