"""The run config in watch mode: its extra rules and defaults, and where it comes from.

Watch mode differs from ``evertrain train`` in four ways, each checked here with a clear
:class:`~evertrain.config.ConfigError`:

- data comes from ``RUN/inbox``: ``data.files`` must be empty;
- the stream is open-ended: ``train.max_steps`` must be unset, ``train.epochs`` is replaced
  by ``watch.epochs_per_file``, and the LR schedule must not need a total length
  (``constant``, ``inverse_sqrt`` or ``wsd``; see :mod:`evertrain.daemon.schedule`). A config
  that does not name a schedule gets ``constant``;
- a config without a ``lora`` key trains a LoRA adapter with the default settings (write
  ``lora: null`` for full fine-tuning);
- ``watch.replay_fraction`` must give a whole number of replay rows per micro-batch
  (``round(fraction * micro_batch_size)``) that is at least 1 and leaves room for the new
  file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evertrain.config import (
    ConfigError,
    LoraConfig,
    RunConfig,
    apply_overrides,
    config_from_json,
    load_config,
)
from evertrain.daemon.schedule import STREAM_SCHEDULES

log = logging.getLogger("evertrain.daemon")


def replay_rows(cfg: RunConfig) -> int:
    """Rows of every micro-batch drawn from earlier files (0 when replay is off)."""
    return round(cfg.watch.replay_fraction * cfg.train.micro_batch_size)


def prepare_watch_config(cfg: RunConfig, origin: str = "config") -> RunConfig:
    """Apply watch mode's defaults to ``cfg`` (a copy) and check its rules.

    Raises:
        ConfigError: a rule above is broken; the message names the key and what to do.
    """
    cfg = cfg.model_copy(deep=True)
    if "lora" not in cfg.model_fields_set:
        cfg.lora = LoraConfig()
    sched = cfg.train.schedule
    if "schedule" not in cfg.train.model_fields_set or "name" not in sched.model_fields_set:
        sched.name = "constant"
    if sched.name not in STREAM_SCHEDULES:
        raise ConfigError(
            f"{origin}: train.schedule.name: {sched.name!r} needs the total number of steps, "
            f"which an open-ended stream of files does not have; use one of "
            f"{', '.join(STREAM_SCHEDULES)} (wsd decays at the end of each file)"
        )
    if cfg.data.files:
        raise ConfigError(
            f"{origin}: data.files: watch mode takes its files from RUN/inbox; remove "
            f"data.files ({len(cfg.data.files)} listed) and drop the files into the inbox"
        )
    if cfg.train.max_steps is not None:
        raise ConfigError(
            f"{origin}: train.max_steps: watch mode trains an open-ended stream; remove it "
            "(each file is trained for watch.epochs_per_file epochs)"
        )
    if cfg.train.parallel == "fsdp":
        raise ConfigError(
            f"{origin}: train.parallel: fsdp is not supported by watch yet (its per-file "
            "evaluations are not in lockstep); use ddp, or `evertrain train` for FSDP2"
        )
    if "epochs" in cfg.train.model_fields_set and cfg.train.epochs != 1:
        raise ConfigError(
            f"{origin}: train.epochs: not used in watch mode; set watch.epochs_per_file instead"
        )
    frac, mbs = cfg.watch.replay_fraction, cfg.train.micro_batch_size
    if frac > 0 and not 1 <= replay_rows(cfg) < mbs:
        raise ConfigError(
            f"{origin}: watch.replay_fraction: {frac} of a micro-batch of {mbs} rows is "
            f"{replay_rows(cfg)} replay row(s); it must be at least 1 and leave at least one "
            "row for the new file: change watch.replay_fraction or train.micro_batch_size"
        )
    return cfg


def resolve_watch_config(
    run_dir: Path, config: Path | None, overrides: list[str], stored: dict[str, Any] | None
) -> RunConfig:
    """The config a ``watch`` start uses, with watch mode's rules applied.

    Args:
        run_dir: the run directory (for messages).
        config: ``--config`` YAML file; None to reuse ``stored``.
        overrides: ``--set dotted.key=value`` items.
        stored: the resolved config of the previous start (from the ledger), or None.

    Raises:
        ConfigError: no config given on a new run, or the config is invalid.
    """
    if config is not None:
        return prepare_watch_config(load_config(config, overrides), str(config))
    if stored is None:
        raise ConfigError(
            f"{run_dir}: a new run needs a config: evertrain watch {run_dir} --config "
            "CONFIG.yaml (see examples/watch-tiny.yaml)"
        )
    return prepare_watch_config(
        config_from_json(apply_overrides(stored, overrides)), f"{run_dir} stored config"
    )
