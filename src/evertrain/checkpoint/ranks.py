"""Checkpoints of multi-process runs: every rank writes its own files, one manifest commits.

Layout (see ``docs/checkpoint-format.md``, "Multi-rank checkpoints"): rank 0 writes the
replicated owners (model, optimizer, ...) and its own per-rank owners under their plain
names (``rng.json``); rank ``r > 0`` writes each per-rank owner ``X`` as owner
``X_rank<r>`` (``rng_rank1.json``, ``rng_rank1.safetensors``) into the same
``step-N.tmp/``. Per-rank files are ordinary owner files of format v1, so every reader
verifies them with no change. The manifest summary records ``"ranks": {"world_size": W,
"per_rank_owners": [...]}``, which lets a reader tell a complete multi-rank checkpoint from
one missing a rank (:func:`rank_problems`). On resume each rank takes its own RNG state
(:func:`rng_state_for_rank`).

The process group is anything with the few collectives of :class:`Collectives` (an
:class:`evertrain.distributed.Group`); this package never imports the group's module.

Commit protocol (:func:`save_ranked`), all ranks in lockstep:

1. Rank 0 waits for an in-flight save, removes leftovers, checks free space, sets an
   existing ``step-N`` aside and creates ``step-N.tmp/``, then broadcasts "go" (or "abort":
   every rank then raises the same error, nothing is written).
2. Every rank writes its files into ``step-N.tmp/`` (each fsynced, hashed as written).
3. All-gather of each rank's report (success flag, file sizes and XXH3-128 digests, or its
   error), as JSON bytes in a uint8 tensor: nothing is pickled. This is the barrier after
   which rank 0 alone proceeds.
4. Only if every rank succeeded: rank 0 writes ``manifest.json`` listing every rank's files,
   renames ``step-N.tmp`` to ``step-N`` and applies retention. Otherwise rank 0 removes
   ``step-N.tmp/``; the previous checkpoint stays the newest valid one.
5. Rank 0 broadcasts the outcome; every rank returns the directory or raises
   :class:`CheckpointWriteError` naming the rank that failed and why.

A rank killed at any point (SIGKILL, OOM) takes the group down (torchrun's behaviour) and
leaves at most ``step-N.tmp/``, which is never a checkpoint.

Asynchronous saves run steps 2-5 in each rank's background writer thread, over a second
process group (see :func:`save_ranked`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from evertrain.checkpoint.commit import write_owner_files
from evertrain.checkpoint.errors import (
    CheckpointError,
    CheckpointWriteError,
    InsufficientDiskSpaceError,
    Problem,
)
from evertrain.checkpoint.format import (
    MANIFEST,
    STEP_DIR_RE,
    PreparedCheckpoint,
    prepare_checkpoint,
    step_dir_name,
)
from evertrain.checkpoint.manager import CheckpointInfo, CheckpointManager
from evertrain.checkpoint.verify import verify_checkpoint
from evertrain.rng import RNGState, rank_seed, seed_everything

_logger = logging.getLogger("evertrain.checkpoint")
# resume messages go to the run's log, next to the trainer's own
_run_log = logging.getLogger("evertrain")
_RANK_OWNER_RE = re.compile(r"(?P<owner>[a-z0-9_]+?)_rank(?P<rank>[1-9][0-9]*)")
# rank 0's broadcast after preparing, and after the commit
_GO, _ABORT_DISK, _ABORT, _COMMITTED, _FAILED = 0, 1, 2, 3, 4


class Collectives(Protocol):
    """What the rank protocols need of a process group (:class:`evertrain.distributed.Group`
    has it); with one process every collective returns its input."""

    @property
    def rank(self) -> int:
        """This process's rank, ``0 <= rank < world_size``."""
        ...

    @property
    def world_size(self) -> int:
        """Number of processes."""
        ...

    def broadcast_ints(self, values: Sequence[int], src: int = 0) -> list[int]:
        """``values`` of rank ``src`` on every rank."""
        ...

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, indexed by rank."""
        ...


class PeerFiles(Protocol):
    """The other ranks' part of a commit, driven by rank 0's
    :func:`~evertrain.checkpoint.commit.commit_checkpoint`."""

    def start(self, tmp: Path) -> None:
        """``tmp`` exists: the other ranks may write their files into it now."""

    def finish(self, tmp: Path, own: Mapping[str, Any]) -> dict[str, Any]:
        """Wait for every rank; return their files' manifest entries (``name -> {"size",
        "xxh3_128"}``). Raises CheckpointWriteError if a rank failed (nothing is committed).
        ``own`` is rank 0's entries, which no other rank's name may repeat."""
        ...

    def fail(self, error: BaseException) -> None:
        """Rank 0 failed with ``error`` (before or after :meth:`start`): release the other
        ranks, which then raise; nothing is committed."""

    def committed(self) -> None:
        """Rank 0 committed the checkpoint (and applied retention): tell the other ranks."""


def rank_owner(owner: str, rank: int) -> str:
    """The owner name under which ``rank`` saves its per-rank owner ``owner``: ``owner``
    itself for rank 0 (a 1-process checkpoint has the plain layout), else
    ``<owner>_rank<rank>``."""
    return owner if rank == 0 else f"{owner}_rank{rank}"


def saved_world_size(states: Mapping[str, Any]) -> int:
    """Processes that wrote a checkpoint, from its owner names: 1 + the highest ``R`` of an
    ``<owner>_rank<R>`` owner (1 when there is none)."""
    ranks = [int(m["rank"]) for n in states if (m := _RANK_OWNER_RE.fullmatch(n))]
    return 1 + max(ranks, default=0)


def rng_state_for_rank(
    states: Mapping[str, Any], *, rank: int, world_size: int, seed: int
) -> dict[str, Any]:
    """The ``rng`` state process ``rank`` of ``world_size`` restores from a checkpoint's
    ``states``.

    Rank 0 takes ``rng``; rank ``r`` takes ``rng_rank<r>``; a rank the checkpoint has no
    state for (it was written by fewer processes) gets generators seeded with
    :func:`~evertrain.rng.rank_seed` ``(seed, r, global_step)``. Rank 0 logs which ranks
    were derived or dropped. Side effect: deriving reseeds this process's RNGs (they are
    then restored from the returned state anyway).

    Raises:
        KeyError: ``states`` has no ``progress`` owner.
    """
    step = int(states["progress"]["global_step"])
    saved = saved_world_size(states)
    if rank == 0 and saved != world_size:
        new = [r for r in range(saved, world_size)]
        gone = [r for r in range(world_size, saved)]
        _run_log.warning(
            "checkpoint written by %d process(es), resuming on %d: %s",
            saved,
            world_size,
            f"ranks {new} start RNG streams derived from (seed, rank, global_step {step})"
            if new
            else f"the RNG states of ranks {gone} are not used",
        )
    name = rank_owner("rng", rank)
    if name in states:
        return dict(states[name])
    seed_everything(rank_seed(seed, rank, step))
    return RNGState().state_dict()


def rank_problems(manifest: Mapping[str, Any]) -> list[Problem]:
    """What a multi-rank checkpoint's manifest lacks: for ``summary["ranks"] = {"world_size":
    W, "per_rank_owners": [X, ...]}``, the files ``X.json`` and ``X_rank<r>.json`` for
    ``r`` in ``1..W-1``. ``[]`` for a 1-process checkpoint (no ``ranks``)."""
    ranks = manifest.get("summary", {}).get("ranks")
    if ranks is None:
        return []
    world, owners = (ranks.get("world_size"), ranks.get("per_rank_owners"))
    if not (
        isinstance(world, int)
        and world >= 1
        and isinstance(owners, list)
        and all(isinstance(o, str) for o in owners)
    ):
        return [Problem(MANIFEST, f"summary.ranks is malformed: {ranks!r}")]
    files = manifest.get("files", {})
    return [
        Problem(
            f"{rank_owner(o, r)}.json",
            f"rank {r} of {world}: not listed in the manifest (the checkpoint lacks that "
            f"rank's state)",
        )
        for r in range(world)
        for o in owners
        if f"{rank_owner(o, r)}.json" not in files
    ]


def _manifest(path: Path) -> dict[str, Any]:
    try:
        m = json.loads((path / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def choose_checkpoint(
    root: Path, group: Collectives, log: Callable[[str], None] | None = None
) -> CheckpointInfo | None:
    """The checkpoint under ``root`` (``RUN/checkpoints``) to resume: the newest that
    verifies completely, every rank's files included
    (:func:`~evertrain.checkpoint.verify_checkpoint` and :func:`rank_problems`).

    Rank 0 chooses (reading every byte of each candidate, newest first; a damaged one is
    reported through ``log`` and skipped, never deleted) and broadcasts the step, so every
    rank resumes the same checkpoint. Collective: every rank must call it.

    Returns:
        The chosen checkpoint, or None if no step directory verifies.
    """
    warn = log or _logger.warning
    chosen = -1
    if group.rank == 0:
        dirs = []
        if root.is_dir():
            for d in root.iterdir():
                m = STEP_DIR_RE.fullmatch(d.name)
                if m and d.is_dir():
                    dirs.append((int(m.group(1)), d))
        for step, path in sorted(dirs, reverse=True):
            problems = verify_checkpoint(path)
            fatal = [p for p in problems if p.fatal]
            if not fatal:
                fatal = rank_problems(_manifest(path))
            if fatal:
                warn(
                    f"WARNING: checkpoint {path} is DAMAGED and will NOT be used: "
                    + "; ".join(str(p) for p in fatal)
                    + " -- falling back to an older checkpoint; the damaged directory "
                    "is left in place for inspection"
                )
                continue
            for problem in problems:
                warn(f"warning: checkpoint {path}: {problem}")
            chosen = step
            break
    chosen = group.broadcast_ints([chosen])[0]
    if chosen < 0:
        return None
    path = root / step_dir_name(chosen)
    summary = _manifest(path).get("summary")
    return CheckpointInfo(path, chosen, summary if isinstance(summary, dict) else {})


# --------------------------------------------------------------------------- saving


class _Leader:
    """Rank 0's side of the protocol; tracks how far it got so that a failure at any point
    still releases the other ranks (a rank left in a collective would wait forever)."""

    def __init__(self, group: Collectives, global_step: int) -> None:
        self.group, self.global_step = group, global_step
        self.phase = "prepare"

    def start(self, tmp: Path) -> None:
        self.group.broadcast_ints([_GO, 0, 0])
        self.phase = "write"

    def finish(self, tmp: Path, own: Mapping[str, Any]) -> dict[str, Any]:
        reports = _gather(self.group, {"ok": True, "files": {}})
        self.phase = "commit"
        failed = [f"rank {r}: {rep.get('error')}" for r, rep in enumerate(reports) if not rep["ok"]]
        if failed:
            raise CheckpointWriteError(
                f"step {self.global_step}: not committed, a rank failed to write its part "
                f"({'; '.join(failed)}); the previous checkpoint stays the newest"
            )
        files: dict[str, Any] = {}
        for r, rep in enumerate(reports[1:], start=1):
            for name, entry in rep["files"].items():
                m = _RANK_OWNER_RE.fullmatch(name.partition(".")[0])
                if m is None or int(m["rank"]) != r or name in own or name in files:
                    raise CheckpointWriteError(
                        f"step {self.global_step}: rank {r} reported file {name!r}, which is "
                        f"not one of its own <owner>_rank{r} files; not committed"
                    )
                files[name] = entry
        return files

    def fail(self, error: BaseException) -> None:
        if self.phase == "prepare":
            if isinstance(error, InsufficientDiskSpaceError):
                free, need = error.free_bytes, error.required_bytes
                self.group.broadcast_ints([_ABORT_DISK, free, need])
            else:
                self.group.broadcast_ints([_ABORT, 0, 0])
            return
        if self.phase == "write":
            _gather(self.group, {"ok": False, "files": {}, "error": f"{error}"})
        self.group.broadcast_ints([_FAILED])

    def committed(self) -> None:
        self.group.broadcast_ints([_COMMITTED])


def _gather(group: Collectives, report: dict[str, Any]) -> list[dict[str, Any]]:
    blobs = group.all_gather_bytes(json.dumps(report).encode())
    return [json.loads(b) for b in blobs]


def _write_peer_part(tmp: Path, prepared: PreparedCheckpoint) -> dict[str, Any]:
    """Write this rank's owners into ``tmp``: their manifest entries."""
    if not tmp.is_dir():
        raise CheckpointWriteError(
            f"{tmp} does not exist on this rank: is the run directory "
            "on a file system every node shares?"
        )
    return write_owner_files(tmp, prepared, prepared.global_step)


def _peer_protocol(
    group: Collectives, tmp: Path, global_step: int, part: Callable[[], dict[str, Any]]
) -> int:
    """A non-zero rank's side after rank 0's "go": write its files (``part``), report,
    learn the outcome. Returns the bytes it wrote; raises CheckpointWriteError if the
    checkpoint was not committed."""
    try:
        files = part()
        report: dict[str, Any] = {"ok": True, "files": files}
    except Exception as e:  # any failure must reach rank 0's gather, or it waits forever
        report = {"ok": False, "files": {}, "error": f"{type(e).__name__}: {e}"}
    reports = _gather(group, report)
    t0 = time.monotonic()
    if group.broadcast_ints([0])[0] != _COMMITTED:
        why = "; ".join(f"rank {r}: {p['error']}" for r, p in enumerate(reports) if not p["ok"])
        raise CheckpointWriteError(
            f"step {global_step}: not committed ({why or 'rank 0 failed to commit: see its error'}"
            f"); the previous checkpoint stays the newest"
        )
    _logger.debug(
        "rank %d: step %d committed (waited %.3fs)", group.rank, global_step, time.monotonic() - t0
    )
    return sum(int(f["size"]) for f in report["files"].values())


def _receive_go(group: Collectives, manager: CheckpointManager, global_step: int) -> None:
    """Rank 0's verdict after preparing: return on "go", else raise what it found."""
    code, free, need = group.broadcast_ints([0, 0, 0])
    if code == _ABORT_DISK:
        raise InsufficientDiskSpaceError(
            manager.root,
            free,
            need,
            f"step {global_step} not saved: rank 0 found {free} bytes free, needs {need}",
        )
    if code != _GO:
        raise CheckpointWriteError(
            f"step {global_step} not saved: rank 0 failed before writing (see its error)"
        )


def save_ranked(
    manager: CheckpointManager,
    group: Collectives,
    global_step: int,
    states: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
    *,
    per_rank_owners: Iterable[str] = ("rng",),
    protect: Iterable[int] = (),
    async_group: Collectives | None = None,
) -> Path:
    """Commit one checkpoint of a multi-process run (the protocol in the module docstring).
    Collective: every rank calls it with the same ``global_step``.

    Synchronous unless ``async_group`` is given. Asynchronous: the training thread of each
    rank only waits for its previous save, takes rank 0's verdict on the preparation
    (step 1, on ``group``) and copies its own states into host memory; steps 2-5 then run
    in each rank's background writer thread, with their collectives on ``async_group``
    (a second process group of the same ranks, :meth:`evertrain.distributed.Group.
    side_group`), so they never interleave with the training thread's collectives on
    ``group``. A failure of steps 2-5 is raised on every rank by its manager's next
    ``check``/``wait``/``close``/save; nothing is committed then, as in the synchronous
    protocol.

    Args:
        manager: the run's checkpoint manager (rank 0 commits and applies retention with it).
        group: this process's group (the training thread's).
        global_step: optimizer steps completed.
        states: on rank 0 every owner; on other ranks at least ``per_rank_owners`` (the rest
            is ignored).
        summary: the manifest summary (rank 0's is used); ``ranks`` is added.
        per_rank_owners: owners each rank saves for itself.
        protect: global_steps retention must not delete (rank 0).
        async_group: write and commit in the background, coordinating over this group.

    Returns:
        The checkpoint directory (on every rank; committed only after the background write
        when asynchronous).

    Raises:
        InsufficientDiskSpaceError: rank 0 found too little free space; nothing written, on
            every rank.
        CheckpointWriteError: some rank failed (named in the message); nothing committed,
            the partial ``step-N.tmp/`` removed, on every rank.
        CheckpointError: invalid states (rank 0's are validated before anything is written).
        Exception: a failed earlier asynchronous save's error.
    """
    owners = sorted(set(per_rank_owners))
    final = manager.root / step_dir_name(global_step)
    tmp = final.with_name(final.name + ".tmp")
    if async_group is not None:
        return _save_ranked_async(
            manager, group, async_group, global_step, states, summary, owners, protect
        )
    if group.rank == 0:
        leader = _Leader(group, global_step)
        full = {**summary, "ranks": {"world_size": group.world_size, "per_rank_owners": owners}}
        try:
            manager.save(global_step, states, full, protect=protect, peers=leader)
        except BaseException as e:
            leader.fail(e)
            raise
        leader.committed()
        return final
    _receive_go(group, manager, global_step)
    mine = {rank_owner(o, group.rank): states[o] for o in owners}

    def part() -> dict[str, Any]:
        return _write_peer_part(tmp, prepare_checkpoint(mine, {}, global_step=global_step))

    _peer_protocol(group, tmp, global_step, part)
    return final


def _save_ranked_async(
    manager: CheckpointManager,
    group: Collectives,
    async_group: Collectives,
    global_step: int,
    states: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
    owners: list[str],
    protect: Iterable[int],
) -> Path:
    final = manager.root / step_dir_name(global_step)
    tmp = final.with_name(final.name + ".tmp")
    if group.rank == 0:
        # the preparation's verdict goes over the training thread's group; the background
        # part reuses the synchronous leader on the side group
        prep = _Leader(group, global_step)
        full = {**summary, "ranks": {"world_size": group.world_size, "per_rank_owners": owners}}
        try:
            manager.save_async(
                global_step, states, full, protect=protect, peers=_Leader(async_group, global_step)
            )
        except BaseException as e:
            prep.fail(e)
            raise
        group.broadcast_ints([_GO, 0, 0])
        return final
    previous: BaseException | None = None
    try:
        manager.wait()
    except BaseException as e:  # still hear rank 0's verdict, or rank 0 would wait forever
        previous = e
    try:
        _receive_go(group, manager, global_step)
    except (CheckpointWriteError, InsufficientDiskSpaceError):
        if previous is None:
            raise
    if previous is not None:
        raise previous  # the root cause, as rank 0 raises it
    mine = {rank_owner(o, group.rank): states[o] for o in owners}
    prepared: PreparedCheckpoint | None = None
    invalid: CheckpointError | None = None
    try:
        prepared = prepare_checkpoint(mine, {}, global_step=global_step)
    except CheckpointError as e:
        invalid = e  # reported to rank 0 by the background part, which then commits nothing

    def write(staged: PreparedCheckpoint | None) -> int:
        code = async_group.broadcast_ints([0, 0, 0])[0]
        if code != _GO:
            raise CheckpointWriteError(
                f"step {global_step} not saved: rank 0 failed before writing (see its error)"
            )

        def part() -> dict[str, Any]:
            if staged is None:
                assert invalid is not None
                raise invalid
            return _write_peer_part(tmp, staged)

        return _peer_protocol(async_group, tmp, global_step, part)

    manager.save_part_async(global_step, prepared, write)
    return final
