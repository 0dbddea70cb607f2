"""Training progress for people: a rich progress bar on a terminal, log lines otherwise."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evertrain.trainer import StepStats, Trainer

log = logging.getLogger("evertrain")
PLAIN_EVERY_SECONDS = 10.0


@contextlib.contextmanager
def attach_progress(trainer: Trainer, max_steps: int | None) -> Iterator[None]:
    """Show steps, loss, LR, tokens/s and ETA while ``trainer.fit`` runs."""
    total = trainer.total_steps or 0
    end = min(total, max_steps) if max_steps else total
    start = trainer.progress.global_step
    t0 = time.monotonic()
    tokens = [0]

    def rate() -> float:
        return tokens[0] / max(time.monotonic() - t0, 1e-9)

    if sys.stderr.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        task = bar.add_task("train", total=end, completed=start, info="")

        def on_step(s: StepStats) -> None:
            tokens[0] += s.tokens
            bar.update(
                task,
                completed=s.global_step,
                info=f"loss {s.loss:.4f} lr {s.lr:.2e} {rate():.0f} tok/s ep {s.epoch}",
            )

        trainer.on_step.append(on_step)
        with bar:
            yield
    else:
        last = [0.0]

        def on_step(s: StepStats) -> None:
            tokens[0] += s.tokens
            now = time.monotonic()
            if now - last[0] >= PLAIN_EVERY_SECONDS or s.global_step in (start + 1, end):
                last[0] = now
                done = s.global_step - start
                eta = (now - t0) / max(done, 1) * (end - s.global_step)
                log.info(
                    "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.0f tok/s epoch %d eta %.0fs",
                    s.global_step,
                    end,
                    s.loss,
                    s.lr,
                    s.grad_norm,
                    rate(),
                    s.epoch,
                    eta,
                )

        trainer.on_step.append(on_step)
        yield
    trainer.on_step.remove(on_step)
