"""Multi-process training under ``torchrun``: the process group, rank info and collectives.

evertrain runs on PyTorch's own distributed engine: start it with ``torchrun --nproc-per-node
N -m evertrain train ...`` (one node) or with ``--nnodes``/``--rdzv-*`` (several); ``torchrun``
sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (see
https://pytorch.org/docs/stable/elastic/run.html#environment-variables), and :func:`setup`
joins the default process group from them: ``gloo`` on CPU, ``nccl`` on CUDA (each process
takes ``cuda:LOCAL_RANK``). Without those variables, or with ``WORLD_SIZE=1``, nothing is
initialised and the run is the plain single-process one, bit for bit.

What is replicated and what is per rank:

- model, optimizer, scheduler, data cursor and progress are identical on every rank
  (DistributedDataParallel averages gradients, so every rank takes the same step); rank 0
  writes them to checkpoints.
- RNG state is per rank (dropout masks must differ between ranks): rank 0 keeps the run's
  seed stream (so one process is the plain run), rank ``r > 0`` is reseeded with
  :func:`~evertrain.rng.rank_seed` after model init, and each rank checkpoints its own generators
  (:mod:`evertrain.checkpoint.ranks`).
- Only rank 0 writes ``metrics.jsonl``, prints and logs below ERROR; logged losses, token
  and example counts are all-reduced, so they describe the global batch.

Every decision that must be the same on every rank (stop on a signal, save on a timer) is
agreed with a collective; a rank deciding alone would leave the others waiting in a
collective forever.

Debug aids (environment variables, read at import):

- ``EVERTRAIN_LOG_EXAMPLE_IDS=1``: rank 0 writes ``{"kind": "example_ids", "global_step",
  "ids"}`` to ``metrics.jsonl`` after each optimizer step: the global example ids (rows of
  the training set) of the step, in global order (see :mod:`evertrain.data.cursor`).
- ``EVERTRAIN_RANK_FAULT=R:point@step[:sub]`` (comma-separated): like ``EVERTRAIN_FAULT``
  (:mod:`evertrain.faults`) but only on rank ``R``; with ``EVERTRAIN_FAULT_ONCE=PATH`` a
  fault fires only if ``PATH`` does not exist, and creates it first, so a group restarted
  by ``torchrun --max-restarts`` runs on.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from evertrain.metrics import MetricsLog
from evertrain.rng import rank_seed, seed_everything

log = logging.getLogger("evertrain")

ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
EXAMPLE_IDS_ENV = "EVERTRAIN_LOG_EXAMPLE_IDS"
_RANK_FAULTS = {
    p.strip() for p in os.environ.get("EVERTRAIN_RANK_FAULT", "").split(",") if p.strip()
}
_FAULT_ONCE = os.environ.get("EVERTRAIN_FAULT_ONCE")


class DistributedError(RuntimeError):
    """The torchrun environment or the device setup is inconsistent (the message says how)."""


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The device of ``train.device`` for this process.

    ``auto`` is ``cuda`` when CUDA is available, else ``cpu``. With several processes,
    ``cuda`` means ``cuda:LOCAL_RANK`` (one GPU per process).

    Raises:
        DistributedError: several processes and ``cuda:N`` other than ``cuda:LOCAL_RANK``
            (NCCL cannot run two ranks on one GPU), or fewer GPUs than local ranks.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if not distributed or device.type != "cuda":
        return device
    have = torch.cuda.device_count()
    if device.index is not None and device.index != local_rank:
        raise DistributedError(
            f"train.device {name!r} with several processes would put ranks on one GPU; use "
            f"'cuda' or 'auto' (each process takes cuda:LOCAL_RANK)"
        )
    if local_rank >= have:
        raise DistributedError(
            f"LOCAL_RANK {local_rank} but this node has {have} CUDA device(s): start at most "
            f"{have} processes per node (torchrun --nproc-per-node {have})"
        )
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class Group:
    """This process's place in the run and the collectives the trainer uses.

    With ``world_size == 1`` every collective returns its input unchanged and touches no
    process group, so a single process computes exactly what it computed before
    multi-process support existed.

    Attributes:
        world_size: number of processes (ranks).
        rank: this process's global rank, ``0 <= rank < world_size``.
        local_rank: its rank on this node (picks the GPU).
        device: where this rank trains (and where NCCL collectives put their tensors).
        backend: ``"gloo"``, ``"nccl"``, or ``None`` for a single process.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    # the torch process group the collectives run on; None: the default group
    pg: Any = field(default=None, compare=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def side_group(self) -> Group:
        """The same ranks over a new gloo process group, for collectives issued from a
        background thread (the asynchronous checkpoint commit) while the training thread
        runs its own on this group: two threads must never interleave collectives on one
        process group (each rank would pair them up in a different order). The group holds
        host tensors only. Collective: every rank must call it, in the same order relative
        to other group creations. With one process: this group.
        """
        if not self.distributed:
            return self
        pg = dist.new_group(backend="gloo")
        return replace(self, backend="gloo", pg=pg)

    def destroy_side_group(self, side: Group) -> None:
        """Destroy ``side`` (from :meth:`side_group`) once no thread uses it: each one holds
        gloo sockets and a thread per rank pair until the process exits."""
        if side.pg is not self.pg and side.pg is not None and dist.is_initialized():
            dist.destroy_process_group(side.pg)

    def tensor(self, values: Sequence[float | int], dtype: torch.dtype) -> torch.Tensor:
        """``values`` as a tensor on the device this group's collectives use."""
        return self._t(values, dtype)

    def _t(self, values: Sequence[float | int], dtype: torch.dtype) -> torch.Tensor:
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        return torch.tensor(list(values), dtype=dtype, device=dev)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.pg)

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks, in place (no host copy: the caller reads it when it
        must); ``t`` as is with one process. ``t`` lives on the backend's device."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.pg)
        return t

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks in float64 (integers below 2**53 stay exact)."""
        if not self.distributed:
            return list(values)
        t = self._t(values, torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.pg)
        return [float(v) for v in t.tolist()]

    def max_ints(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum over ranks."""
        if not self.distributed:
            return list(values)
        t = self._t(values, torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
        return [int(v) for v in t.tolist()]

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return bool(self.max_ints([int(flag)])[0])

    def broadcast_ints(self, values: Sequence[int], src: int = 0) -> list[int]:
        """``values`` of rank ``src`` on every rank (other ranks pass placeholders of the
        same length)."""
        if not self.distributed:
            return list(values)
        t = self._t(values, torch.int64)
        dist.broadcast(t, src=src, group=self.pg)
        return [int(v) for v in t.tolist()]

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (equal lengths on all ranks), indexed by rank."""
        if not self.distributed:
            return [list(values)]
        t = self._t(values, torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.pg)
        return [[int(v) for v in o.tolist()] for o in out]

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (any lengths), indexed by rank. Raw bytes in uint8 tensors:
        nothing is pickled (``all_gather_object`` would pickle)."""
        if not self.distributed:
            return [bytes(data)]
        sizes = self.all_gather_ints([len(data)])
        longest = max(1, *(s[0] for s in sizes))
        buf = self._t([0] * longest, torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(buf.device)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(out, buf, group=self.pg)
        return [o[: s[0]].cpu().numpy().tobytes() for o, s in zip(out, sizes, strict=True)]

    def broadcast_json(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s JSON-able ``value`` on every rank (others pass anything, e.g.
        None): how rank 0 hands decisions (which file to train next, stop) to the others,
        as JSON bytes, never pickled."""
        if not self.distributed:
            return value
        data = json.dumps(value).encode() if self.rank == src else b""
        size = self.broadcast_ints([len(data)], src=src)[0]
        buf = self._t([0] * max(size, 1), torch.uint8)
        if self.rank == src and data:
            buf[:size] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(buf.device)
        dist.broadcast(buf, src=src, group=self.pg)
        return json.loads(buf[:size].cpu().numpy().tobytes())

    def agree_stop(self, requested: str | None) -> str | None:
        """The stop signal's name if any rank received one (the highest signal number when
        several did), else None: every rank stops after the same optimizer step."""
        if not self.distributed:
            return requested
        num = self.max_ints([signal.Signals[requested].value if requested else 0])[0]
        return signal.Signals(num).name if num else None

    def maybe_crash(self, point: str, step: int, sub: int | None = None) -> None:
        """SIGKILL this process at ``point@step[:sub]`` if ``EVERTRAIN_RANK_FAULT`` names
        this rank there (see the module docstring)."""
        if not _RANK_FAULTS:
            return
        key = f"{self.rank}:{point}@{step}" + ("" if sub is None else f":{sub}")
        if key not in _RANK_FAULTS:
            return
        if _FAULT_ONCE:
            marker = Path(_FAULT_ONCE)
            if marker.exists():
                return
            marker.write_text(key + "\n", encoding="utf-8")
        os.kill(os.getpid(), signal.SIGKILL)


def current_group() -> Group:
    """This process's place in the run, from the default process group if the caller
    initialised one, else a single process.

    Raises:
        DistributedError: torchrun started several processes but no process group exists yet.
    """
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return Group(dist.get_world_size(), dist.get_rank(), local, device, backend)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']}: call torch.distributed."
            f"init_process_group() before building the Checkpointer"
        )
    return Group()


def _env_int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DistributedError(f"environment {key}={env[key]!r} is not an integer") from None


def setup(device_name: str, env: dict[str, str] | None = None) -> Group:
    """Join the torchrun process group (if this process was started by torchrun with more
    than one process) and return this rank's :class:`Group`.

    Idempotent: an already initialised default group is reused (it must agree with the
    environment). The group is destroyed at interpreter exit. Ranks other than 0 raise the
    ``evertrain`` logger to ERROR, so a run logs once.

    Args:
        device_name: ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        env: the environment (default ``os.environ``).

    Raises:
        DistributedError: some but not all of WORLD_SIZE/RANK/LOCAL_RANK set, values that are
            not integers or out of range, an initialised group that disagrees, or a device
            problem (see :func:`resolve_device`).
    """
    env = dict(os.environ if env is None else env)
    present = [k for k in ENV_KEYS if k in env]
    if not present:
        return Group(device=resolve_device(device_name))
    if len(present) != len(ENV_KEYS):
        missing = [k for k in ENV_KEYS if k not in env]
        raise DistributedError(
            f"{', '.join(present)} set but not {', '.join(missing)}: start multi-process "
            "runs with torchrun (torchrun --nproc-per-node N -m evertrain train ...)"
        )
    world, rank, local = (_env_int(env, k) for k in ENV_KEYS)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(
            f"inconsistent torchrun environment: WORLD_SIZE={world} RANK={rank} LOCAL_RANK={local}"
        )
    device = resolve_device(device_name, local, distributed=world > 1)
    if world == 1:
        return Group(local_rank=local, device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if (dist.get_world_size(), dist.get_rank()) != (world, rank):
            raise DistributedError(
                f"a process group of world size {dist.get_world_size()} (rank "
                f"{dist.get_rank()}) is already initialised; the environment says "
                f"WORLD_SIZE={world} RANK={rank}"
            )
    else:
        store = _attempt_store(env, world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        atexit.register(_destroy)
    if rank > 0:
        log.setLevel(logging.ERROR)
    return Group(world, rank, local, device, backend)


def _attempt_store(env: dict[str, str], world: int) -> dist.Store | None:
    """torchrun's agent store, with keys prefixed by the restart attempt; None when the
    workers do not share the agent's store (then rank 0 hosts a fresh one per attempt).

    The agent's store outlives a ``--max-restarts`` restart, and the process group's
    address keys are not per attempt: a restarted worker can read the gloo/NCCL address its
    dead predecessor published and fail with "connectFullMesh failed ... Connection
    refused" (pytorch/pytorch#167288). A prefix per attempt gives each attempt its own keys.
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    try:
        host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    except (KeyError, ValueError):
        raise DistributedError(
            "torchrun's agent store is in use but MASTER_ADDR/MASTER_PORT are missing or "
            "not a host and a port number"
        ) from None
    store = dist.TCPStore(host, port, world, is_master=False, timeout=default_pg_timeout)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"evertrain/attempt-{attempt}/", store)


def finish() -> None:
    """End this process's part in the default process group on a normal exit (collective:
    every rank calls it): the objects holding the group (DDP's reducer, FSDP2's hooks) are
    collected, every rank passes a barrier, then the group is destroyed. Left to interpreter
    exit, a rank could tear gloo down while a peer still used it, and abort ("terminate
    called without an active exception", SIGABRT, a failed torchrun job after a good run).
    No-op without a group."""
    if not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _destroy() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # peers already gone: nothing left to tear down
            dist.destroy_process_group()


# --------------------------------------------------------------------------- model


def wrap_model(model: torch.nn.Module, group: Group) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else ``model``.

    DDP broadcasts rank 0's parameters when it is built and averages gradients in
    backward. Buffers are not synchronised in forward (``broadcast_buffers=False``):
    language models keep no running statistics in buffers (every rank computes identical
    ones), and a buffer broadcast is a collective in every forward, which would hang
    evaluation, where ranks run different numbers of batches.
    """
    if not group.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [group.device.index] if group.device.type == "cuda" else None
    # torch >= 2.13 renamed the forward half of broadcast_buffers (the old name warns)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    options: dict[str, Any] = {sync: False}
    return DistributedDataParallel(model, device_ids=ids, **options)


def no_sync(module: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip DDP's gradient all-reduce on accumulation micro-steps other than the ``last``
    (gradients accumulate locally; the last backward reduces their sum once)."""
    if last or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()  # type: ignore[no-any-return,operator]


# --------------------------------------------------------------------------- RNG


def seed_rank(seed: int, group: Group) -> None:
    """Reseed every RNG of a rank ``r > 0`` with :func:`rank_seed` ``(seed, r, 0)``; rank 0
    keeps the run's seed stream (a 1-process run is the plain run)."""
    if group.rank > 0:
        seed_everything(rank_seed(seed, group.rank, 0))


# --------------------------------------------------------------------------- debug


class ExampleIdLog:
    """``on_step`` hook writing each step's global example ids to ``metrics.jsonl`` (rank 0).

    Every rank must run it (it gathers ids from all ranks). Reads the ids the trainer's
    loader actually handed out (:attr:`evertrain.data.loader.DataIterator.consumed`), this
    step's ``grad_accum_steps`` micro-batches, and orders them micro-step by micro-step,
    rank by rank: the global order of :mod:`evertrain.data.cursor`.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def __call__(self, stats: Any) -> None:
        tr = self.trainer
        loader = getattr(tr, "loader", None)
        if loader is None:
            return
        mine = [loader.consumed.popleft() for _ in range(len(loader.consumed))]
        flat = [i for ids in mine for i in ids]
        group: Group = tr.dist
        everyone = group.all_gather_ints(flat)
        micro = len(mine[0]) if mine else 0
        order: list[int] = []
        for m in range(len(mine)):
            for ids in everyone:
                order += ids[m * micro : (m + 1) * micro]
        if group.rank == 0:
            order = [i for i in order if i >= 0]  # not the padding rows (index -1)
            tr.metrics.write(
                {"kind": "example_ids", "global_step": stats.global_step, "ids": order}
            )


def debug_hooks(trainer: Any) -> list[Callable[[Any], None]]:
    """The ``on_step`` hooks the environment asks for (``EVERTRAIN_LOG_EXAMPLE_IDS``)."""
    return [ExampleIdLog(trainer)] if os.environ.get(EXAMPLE_IDS_ENV) else []


def eval_totals(group: Group, total: float, count: int) -> tuple[float, int]:
    """Token-weighted loss sum and token count over all ranks' shares of an evaluation."""
    if not group.distributed:
        return total, count
    t, c = group.sum_floats([total, float(count)])
    return t, int(c)


__all__ = [
    "DistributedError",
    "finish",
    "ExampleIdLog",
    "Group",
    "NullMetricsLog",
    "PER_RANK_OWNERS",
    "debug_hooks",
    "eval_totals",
    "no_sync",
    "rank_seed",
    "resolve_device",
    "seed_rank",
    "setup",
    "wrap_model",
]


PER_RANK_OWNERS = ("rng",)  # owners every rank checkpoints for itself


class NullMetricsLog(MetricsLog):
    """The metrics log of ranks > 0: only rank 0 writes ``metrics.jsonl`` (two writers
    would interleave and truncate each other's lines on resume)."""

    def __init__(self) -> None:  # no file is opened
        self.path = Path(os.devnull)

    def rewind(self, offset: int) -> None:
        pass

    def start_trackers(self, global_step: int) -> None:
        pass  # trackers report rank 0's numbers only

    def write(self, record: dict[str, Any]) -> None:
        pass

    def offset(self) -> int:
        return 0

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass
