"""The default torch thread count (issue 13, item 9): the cores of this process divided
among the node's processes, less data-loader workers; OMP_NUM_THREADS and model.num_threads
win; a resume with another count says it may not be bit-identical."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from evertrain import threads
from evertrain.resume_checks import warn_threads


@pytest.fixture(autouse=True)
def keep_threads() -> object:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_physical_cores_respects_the_affinity() -> None:
    assert 1 <= threads.physical_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cores", "local", "workers", "want"),
    [
        (8, 1, 0, 7),
        (8, 2, 0, 3),
        (8, 2, 1, 2),
        (8, 3, 0, 2),
        (2, 1, 0, 1),
        (1, 1, 0, 1),
        (2, 4, 0, 1),
        (2, 1, 4, 1),
    ],  # fmt: skip
)
def test_default_divides_cores_among_processes_and_workers(
    monkeypatch: pytest.MonkeyPatch, cores: int, local: int, workers: int, want: int
) -> None:
    monkeypatch.setattr(threads, "physical_cores", lambda: cores)
    assert threads.default_threads(local, workers) == want


def test_apply_threads_order_of_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "physical_cores", lambda: 7)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun, 2 processes on this node
    assert threads.apply_threads(None) == 3 and torch.get_num_threads() == 3
    assert threads.apply_threads(None, loader_workers=1) == 2 and torch.get_num_threads() == 2
    assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1  # model.num_threads
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting stays
    assert threads.apply_threads(None) == 2 and torch.get_num_threads() == 2


def test_a_resume_on_another_thread_count_warns(caplog: pytest.LogCaptureFixture) -> None:
    torch.set_num_threads(1)
    with caplog.at_level(logging.WARNING, logger="evertrain"):
        warn_threads(1)
        assert caplog.text == ""
        warn_threads(4)
    assert "saved with 4 torch threads, this process has 1" in caplog.text
    assert "model.num_threads: 4" in caplog.text
