"""DataCursor and make_loader: order, exact O(1) resume, world-size independence, RNG hygiene."""

from __future__ import annotations

import itertools

import pytest
import torch

from evertrain.data import DataCursor, TokenizedDataset, epoch_permutation, make_loader
from evertrain.state import StateError, StateVersionError

N, SEQ, SEED = 37, 8, 1234


def make_dataset(n: int = N) -> TokenizedDataset:
    # Row i holds the value i everywhere, so a batch shows which rows it read.
    ids = torch.arange(n, dtype=torch.int32)[:, None].expand(n, SEQ).contiguous()
    return TokenizedDataset(
        ids, ids.clone(), torch.ones(n, SEQ, dtype=torch.bool), {"split": "test"}
    )


def cursor(ds: TokenizedDataset, g: int = 4, seed: int = SEED) -> DataCursor:
    return DataCursor(seed, len(ds), g, ds.fingerprint)


def rows(batch: dict[str, torch.Tensor]) -> list[int]:
    """The row ids of a batch, -1 for a padding row (whose labels are all ignored)."""
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] == SEQ
    real = batch["row_mask"].tolist()
    pads = batch["labels"][~batch["row_mask"]]
    assert bool((pads == -100).all()), "a padding row must carry no target token"
    return [i if r else -1 for i, r in zip(batch["input_ids"][:, 0].tolist(), real, strict=True)]


def take(it: object, k: int) -> list[list[int]]:
    return [rows(b) for b in itertools.islice(it, k)]  # type: ignore[call-overload]


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    torch.manual_seed(0)
    a = epoch_permutation(SEED, 3, N)
    torch.manual_seed(99)
    assert epoch_permutation(SEED, 3, N) == a and sorted(a) == list(range(N))
    assert epoch_permutation(SEED, 4, N) != a and epoch_permutation(SEED + 1, 3, N) != a


def test_advance_rolls_over_epochs_with_every_example_once() -> None:
    ds = make_dataset()
    c = cursor(ds)
    assert c.steps_per_epoch == 10  # ceil(37 / 4): the last global batch holds 1 example
    for _ in range(10):
        c.advance()
    assert (c.epoch, c.offset, c.examples_seen) == (1, 0, 37)
    c.advance()
    assert (c.epoch, c.offset, c.step_in_epoch, c.examples_seen) == (1, 4, 1, 41)
    # indices() follows the permutation of each epoch, continuing across the boundary; the
    # epoch's last micro-batch is its remaining example and padding.
    it = c.indices()
    perm1, perm2 = epoch_permutation(SEED, 1, N), epoch_permutation(SEED, 2, N)
    got = list(itertools.islice(it, 10))
    assert got[:8] == [perm1[s * 4 : s * 4 + 4] for s in range(1, 9)]
    assert got[8] == [perm1[36], -1, -1, -1]
    assert got[9] == perm2[:4]


def test_fewer_examples_than_a_global_batch_are_one_padded_step() -> None:
    with pytest.raises(ValueError, match="no training examples"):
        DataCursor(0, 0, 4, "x")
    c = DataCursor(0, 3, 4, "x")
    assert (c.steps_per_epoch, c.micro_steps(2), c.micro_steps(1, world_size=2)) == (1, 2, 2)
    assert c.advance_micro(2) == 2 and c.advance_micro(2) == 1
    assert (c.epoch, c.offset, c.examples_seen) == (1, 0, 3)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(("k", "m"), [(3, 4), (7, 6)])  # (7, 6) crosses into epoch 1
def test_resume_matches_an_uninterrupted_loader(num_workers: int, k: int, m: int) -> None:
    ds = make_dataset()
    ref_cursor = cursor(ds)
    ref = take(
        make_loader(ds, ref_cursor, micro_batch_size=4, num_workers=num_workers, seed=SEED), k + m
    )
    # A run that consumed k batches, checkpointed, died, and came back in a fresh process.
    c = cursor(ds)
    it = make_loader(ds, c, micro_batch_size=4, num_workers=num_workers, seed=SEED)
    first = take(it, k)
    for _ in range(k):
        c.advance()
    it.close()
    state = c.state_dict()
    fresh = cursor(make_dataset())
    fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.offset) == (c.epoch, c.offset)
    rest = take(make_loader(ds, fresh, micro_batch_size=4, num_workers=num_workers, seed=SEED), m)
    assert first + rest == ref
    real = [[i for i in r if i >= 0] for r in ref]
    assert all(len(r) == 4 for r in ref) and all(len(set(r)) == len(r) for r in real)
    if k + m > 9:  # crossed the end of epoch 0: its one example left, then padding
        assert ref[9][1:] == [-1, -1, -1] and ref[9][0] >= 0


def test_order_does_not_depend_on_world_size() -> None:
    ds = make_dataset()
    c = cursor(ds, g=4)
    for _ in range(5):
        c.advance()
    one = take(make_loader(ds, c, micro_batch_size=4, num_workers=0, seed=SEED), 12)
    r0 = take(
        make_loader(ds, c, micro_batch_size=2, num_workers=0, seed=SEED, rank=0, world_size=2), 12
    )
    r1 = take(
        make_loader(ds, c, micro_batch_size=2, num_workers=0, seed=SEED, rank=1, world_size=2), 12
    )
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one


def test_resume_reads_no_consumed_example() -> None:
    calls = []
    for epoch, offset in ((0, 0), (500, 32)):
        ds = make_dataset()
        c = cursor(ds)
        state = c.state_dict() | {
            "epoch": epoch,
            "offset": offset,
            "examples_seen": epoch * 37 + offset,
        }
        c.load_state_dict(state)
        it = make_loader(ds, c, micro_batch_size=4, num_workers=0, seed=SEED)
        got = take(it, 3)
        calls.append(ds.getitem_calls)
        perm = epoch_permutation(SEED, epoch, N)
        assert got[0] == perm[offset : offset + 4]
    # 3 batches of 4 rows; from offset 32 they are rows 32-35, row 36 + 3 padding rows (one
    # read of row 0 as their template) and 4 rows of the next epoch: 10 reads
    assert calls == [12, 10]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_does_not_touch_the_global_rng(num_workers: int) -> None:
    ds = make_dataset()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    it = make_loader(ds, cursor(ds), micro_batch_size=4, num_workers=num_workers, seed=SEED)
    take(it, 3)
    it.close()
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_checks_sizes_and_dataset() -> None:
    ds = make_dataset()
    with pytest.raises(ValueError, match="global batch size"):
        make_loader(ds, cursor(ds), micro_batch_size=3, num_workers=0, seed=SEED)
    with pytest.raises(ValueError, match="not the one the cursor was made for"):
        make_loader(make_dataset(N + 1), cursor(ds), micro_batch_size=4, num_workers=0, seed=SEED)
    with pytest.raises(ValueError, match="must divide"):
        cursor(ds).indices(0, 3)


def test_state_dict_is_json_and_refuses_changed_data() -> None:
    ds = make_dataset()
    c = cursor(ds)
    for _ in range(3):
        c.advance()
    s = c.state_dict()
    assert s == {
        "version": 1,
        "epoch": 0,
        "offset": 12,
        "examples_seen": 12,
        "seed": SEED,
        "num_examples": N,
        "global_batch_size": 4,
        "fingerprint": ds.fingerprint,
    }
    with pytest.raises(StateError, match="training data changed"):
        cursor(ds).load_state_dict(s | {"fingerprint": "0" * 32})
    other = make_dataset(N + 1)
    with pytest.raises(StateError, match="training data changed"):
        DataCursor(SEED, N + 1, 4, other.fingerprint).load_state_dict(s)
    with pytest.raises(StateError, match="seed changed"):
        cursor(ds, seed=SEED + 1).load_state_dict(s)
    with pytest.raises(StateVersionError):
        cursor(ds).load_state_dict(s | {"version": 2})
    with pytest.raises(StateError, match="inconsistent"):
        cursor(ds).load_state_dict(s | {"offset": 13})


def test_batch_size_change_only_at_a_common_multiple() -> None:
    ds = make_dataset()
    c = cursor(ds, g=4)
    for _ in range(3):
        c.advance()  # offset 12
    with pytest.raises(StateError, match="global batch size changed"):
        cursor(ds, g=8).load_state_dict(c.state_dict())
    six = cursor(ds, g=6)
    six.load_state_dict(c.state_dict())
    assert (six.epoch, six.offset, six.examples_seen) == (0, 12, 12)
    assert next(six.indices()) == epoch_permutation(SEED, 0, N)[12:18]
    # Offset 32 of G=4 is 4 whole batches of G=8: it continues there, with the epoch's
    # last 5 examples as its short last global batch.
    for _ in range(5):
        c.advance()
    assert (c.epoch, c.offset) == (0, 32)
    eight = cursor(ds, g=8)
    eight.load_state_dict(c.state_dict())
    assert (eight.epoch, eight.offset, eight.examples_seen) == (0, 32, 32)
    assert (
        eight.micro_steps(4) == 2
        and next(eight.indices(micro_batch_size=4)) == (epoch_permutation(SEED, 0, N)[32:36])
    )


def global_steps(ds: TokenizedDataset, g: int, mbs: int, world: int, steps: int) -> list[list[int]]:
    """The example ids of each optimizer step when a cursor batch of ``g`` is trained as
    ``g // (mbs * world)`` accumulation micro-steps on ``world`` ranks, in global order
    (micro-step by micro-step, rank by rank), advancing the cursor as the trainer does."""
    c = cursor(ds, g=g)
    its = [
        make_loader(ds, c, micro_batch_size=mbs, num_workers=0, seed=SEED, rank=r, world_size=world)
        for r in range(world)
    ]
    out = []
    for _ in range(steps):
        ids: list[int] = []
        for _micro in range(c.micro_steps(mbs, world)):
            for it in its:
                ids += [i for i in rows(next(it)) if i >= 0]
            c.advance_micro(mbs, world)
        assert c.offset % g == 0  # between optimizer steps the offset is whole batches
        out.append(ids)
    return out


def test_split_into_micro_steps_and_ranks_does_not_change_a_step() -> None:
    """1 process x accumulation 4, 2 x 2, 4 x 1 and 2 processes with 1-row micro-batches
    (x accumulation 4) see the same examples, in the same global order, in every optimizer
    step, across an epoch boundary; every example once per epoch (the last step of an
    epoch holds the 37 % 8 = 5 left, padded per micro-batch)."""
    ds = make_dataset()
    ref = global_steps(ds, 8, 2, 1, 10)
    assert cursor(ds, g=8).steps_per_epoch == 5  # ceil(37 / 8)
    perm0, perm1 = epoch_permutation(SEED, 0, N), epoch_permutation(SEED, 1, N)
    assert ref[:5] == [perm0[s * 8 : s * 8 + 8] for s in range(5)]
    assert ref[5:10] == [perm1[s * 8 : s * 8 + 8] for s in range(5)]
    assert sorted(i for step in ref[:5] for i in step) == list(range(N))
    for mbs, world in ((4, 2), (2, 4), (1, 2), (8, 1)):
        assert global_steps(ds, 8, mbs, world, 10) == ref, (mbs, world)


def test_advance_by_micro_batches_and_split_checks() -> None:
    ds = make_dataset()
    c = cursor(ds, g=8)
    for _ in range(3):
        c.advance(2)
    assert (c.epoch, c.offset, c.examples_seen) == (0, 6, 6)
    with pytest.raises(ValueError, match="inside a global micro-batch"):
        make_loader(ds, c, micro_batch_size=4, num_workers=0, seed=SEED)
    c.advance(2)
    for _ in range(4):
        c.advance()
    assert (c.epoch, c.offset, c.examples_seen) == (1, 0, 37)  # 4 batches of 8, then 5
    with pytest.raises(ValueError, match="cannot advance"):
        c.advance(40)
    with pytest.raises(ValueError, match="does not divide"):
        make_loader(ds, c, micro_batch_size=3, num_workers=0, seed=SEED, world_size=2)
    with pytest.raises(ValueError, match="out of range"):
        make_loader(ds, c, micro_batch_size=4, num_workers=0, seed=SEED, rank=2, world_size=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_consumed_lists_the_indices_handed_out(num_workers: int) -> None:
    ds = make_dataset()
    c = cursor(ds, g=4)
    it = make_loader(ds, c, micro_batch_size=2, num_workers=num_workers, seed=SEED)
    got = take(it, 5)
    assert list(it.consumed) == got
    it.close()
