"""Typed, validated run configuration: one pydantic model per component.

A config comes from a YAML file, a ``dict`` or an OmegaConf ``DictConfig`` and is validated
in full on load: unknown keys, wrong types and impossible combinations raise
:class:`ConfigError` with the dotted key path and the reason, in one line. The resolved
config is stored in every checkpoint as plain JSON; on resume
:func:`~evertrain.config_diff.diff_configs` lists what changed and
:func:`~evertrain.config_diff.breaking_changes` picks the changes that would break
exactness or tensor shapes (refused unless ``--allow-config-change``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from evertrain.config_data import check_chat_template, check_columns, is_template_path
from evertrain.config_hints import suggestion

# re-exported (``as``): callers import these three from evertrain.config
from evertrain.config_overrides import apply_overrides as apply_overrides
from evertrain.config_overrides import parse_override as parse_override
from evertrain.config_yaml import UniqueKeyLoader
from evertrain.errors import ConfigError as ConfigError

# causal: a decoder-only LM (AutoModelForCausalLM); seq2seq: an encoder-decoder model
# (AutoModelForSeq2SeqLM, e.g. T5) trained on prompt -> completion pairs.
ModelKind = Literal["causal", "seq2seq"]


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    # strict=True: "4" is not an integer; YAML already gives typed values.
    # allow_inf_nan=False: `lr: .inf` would train to NaN and still report "done".
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False
    )


class TinyModelConfig(_Section):
    """Shape of the built-in random-init test model: Llama (``model.kind: causal``) or T5
    (``model.kind: seq2seq``: ``d_model`` = hidden_size, ``d_ff`` = intermediate_size,
    ``num_layers`` encoder and decoder blocks; ``max_position_embeddings`` is unused, T5
    has relative positions)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(128, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)


class ModelConfig(_Section):
    """Which model to train and how to hold its weights.

    ``source``: ``tiny`` (built-in random-init test model), ``smollm2-135m`` (bundled real
    model), a local Hugging Face model directory, or a local ``.gguf`` file.

    ``kind``: ``causal`` (default; ``AutoModelForCausalLM``) or ``seq2seq``
    (``AutoModelForSeq2SeqLM``: an encoder-decoder such as T5, from ``tiny`` or a local
    Hugging Face directory; trains on ``prompt_completion`` data, one pair per row, so
    ``data.packing`` is off). Dumped only when ``seq2seq``, so a causal run's stored config
    is what it was before the key existed.
    """

    source: str = "tiny"
    kind: ModelKind = "causal"
    dtype: Literal["float32", "bfloat16"] = "float32"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # attention dropout of the tiny model
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    cache_dir: str | None = None  # converted-model cache; default ~/.cache/evertrain/models
    # torch.set_num_threads; None: $OMP_NUM_THREADS, else the cores but one, per process
    # on this node, less data-loader workers (evertrain.threads)
    num_threads: int | None = Field(None, gt=0)
    compile: bool = False  # torch.compile the model (checkpoints keep the original names)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Configs are stored in checkpoints and diffed on resume: a causal run written
        # before model.kind existed must read back without a difference.
        out = handler(self)
        if isinstance(out, dict) and out.get("kind") == "causal":
            del out["kind"]
        return out  # type: ignore[no-any-return]

    def target_tokens(self, labels: Any) -> int:
        """Labels of a batch this kind of model scores: see
        :func:`evertrain.data.target_tokens` (``labels``: ``long [batch, seq_len]``)."""
        from evertrain.data.pack import target_tokens

        return target_tokens(labels, self.kind)


class LoraConfig(_Section):
    """LoRA adapter (PEFT). Absent from the config = full fine-tuning."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # module names, "all-linear" (PEFT: every linear layer but the output head), or None:
    # the architecture's attention projections
    target_modules: list[str] | Literal["all-linear"] | None = None
    use_dora: bool = False  # DoRA: weight-decomposed LoRA (PEFT's use_dora)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (PEFT's use_rslora)
    # modules trained in full next to the adapter and saved with it (e.g. [lm_head])
    modules_to_save: list[str] | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # the options added later are stored only when set: a run stored before they
        # existed resumes without a config difference
        out = handler(self)
        if isinstance(out, dict):
            for key in ("use_dora", "use_rslora", "modules_to_save"):
                if out.get(key) in (False, None):
                    out.pop(key, None)
        return out  # type: ignore[no-any-return]


DEFAULT_MAX_RECORD_BYTES = 1_000_000


class DataConfig(_Section):
    """Training data: files, record format, tokenisation and the train/val split.

    ``format``: ``auto`` (detected per file from the first record's keys), ``text``,
    ``prompt_completion``, ``messages``, ``alpaca`` or ``sharegpt`` (see
    :mod:`evertrain.data.formats` and :mod:`evertrain.data.dialects`).

    ``columns``: ``{our field: the data's column}``, e.g. ``{prompt: question, completion:
    answer}``: each record's column is read as that field (before the format is detected).
    Fields: :data:`~evertrain.config_data.DATA_FIELDS`. Dumped only when set.

    ``chat_template``: a Jinja chat template, or the path of a ``.jinja`` file holding one,
    for ``messages``/``sharegpt`` data: set on the tokenizer in place of its own (or of the
    built-in fallback of a tokenizer that has none). Dumped only when set.
    """

    files: list[str] = Field(default_factory=list)
    format: Literal["auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt"] = "auto"
    seq_len: int = Field(128, gt=1)
    # greedy (true): documents concatenated and cut into seq_len rows, attention across
    # them; masked: the same rows, each document attending only to itself with positions
    # from 0 (evertrain.data.pack); none (false): one document per row, padded
    packing: bool | Literal["none", "greedy", "masked"] = True
    text_split: Literal["documents", "chunks"] = "documents"  # plain .txt files
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    num_workers: int = Field(0, ge=0)
    # drop each micro-batch's trailing columns that are padding in every row (the same
    # loss, less compute on padded rows: evertrain.data.loader.trim_padding); None: on
    # unless model.compile (a compiled graph specialises on the length: a resume that meets
    # another length first would compile another graph, whose sums may differ)
    trim_padding: bool | None = None
    on_bad_record: Literal["fail", "skip"] = "fail"
    # a larger record (e.g. one JSONL line) is a bad record, refused before it is parsed
    max_record_bytes: int = Field(DEFAULT_MAX_RECORD_BYTES, gt=0)
    # tokenised-data cache: None = ~/.cache/evertrain/data for `train`/`eval` (none for
    # `watch`, which tokenises each file once), "off" = none
    cache_dir: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    chat_template: str | None = None
    # model.kind, copied in by RunConfig (not a key of its own): how documents become rows
    _model_kind: ModelKind = PrivateAttr("causal")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Dumped only when changed: a run stored before the key existed resumes without a
        # config difference, and its tokenised-data cache keys stay what they were.
        out = handler(self)
        if isinstance(out, dict) and out.get("max_record_bytes") == DEFAULT_MAX_RECORD_BYTES:
            del out["max_record_bytes"]
        if isinstance(out, dict) and not out.get("columns"):
            out.pop("columns", None)
        if isinstance(out, dict) and out.get("chat_template") is None:
            out.pop("chat_template", None)
        if isinstance(out, dict) and out.get("trim_padding") is None:
            out.pop("trim_padding", None)
        return out  # type: ignore[no-any-return]

    @field_validator("columns")
    @classmethod
    def _check_columns(cls, v: dict[str, str]) -> dict[str, str]:
        check_columns(v)
        return v

    @field_validator("chat_template")
    @classmethod
    def _check_chat_template(cls, v: str | None) -> str | None:
        check_chat_template(v)
        return v

    @property
    def packing_mode(self) -> Literal["none", "greedy", "masked"]:
        """``data.packing`` with the booleans spelled out (true: greedy, false: none)."""
        if isinstance(self.packing, bool):
            return "greedy" if self.packing else "none"
        return self.packing

    @property
    def model_kind(self) -> ModelKind:
        """``model.kind`` of the run config this section belongs to (``causal`` for a
        section built on its own): seq2seq rows are encoder input + decoder target."""
        return self._model_kind


class ScheduleConfig(_Section):
    """LR schedule, a pure function of global_step (see :mod:`evertrain.schedule`)."""

    name: Literal["constant", "linear", "cosine", "wsd", "inverse_sqrt"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    decay_steps: int | None = Field(None, ge=0)  # wsd: length of the final decay, in steps


class TrainConfig(_Section):
    """Optimisation: batch geometry, optimizer, schedule, precision, evaluation."""

    micro_batch_size: int = Field(4, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    # no optimizer here is stable past these; a larger value is a typo (2e4 for 2e-4)
    lr: float = Field(2.0e-4, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0)  # sgd only
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # auto: bf16 where the device multiplies it natively, else fp32 (evertrain.precision)
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
    eval_every_steps: int | None = Field(None, gt=0)
    eval_max_batches: int | None = Field(None, gt=0)
    # a non-finite loss or gradient norm: stop (exit 3, nothing applied or saved), skip
    # the step's batches (no update; counted in the metrics and the ledger), or rollback
    # (also reload model and optimizer from the newest checkpoint; evertrain.guard)
    on_nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    # how several torchrun processes share the model: ddp (each holds all of it) or fsdp
    # (FSDP2 fully_shard: each holds a slice of weights, gradients and optimizer state)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # recompute activations in the backward pass (transformers' gradient checkpointing,
    # non-reentrant): less memory, the same result (the RNG is restored for the recompute)
    gradient_checkpointing: bool = False

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Dumped only when changed: a run stored before the key existed resumes without a
        # config difference.
        out = handler(self)
        if isinstance(out, dict) and out.get("on_nonfinite") == "stop":
            del out["on_nonfinite"]
        if isinstance(out, dict) and out.get("parallel") == "ddp":
            del out["parallel"]
        if isinstance(out, dict) and out.get("gradient_checkpointing") is False:
            del out["gradient_checkpointing"]
        return out  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must be two numbers in [0, 1)")
        if self.optimizer != "sgd" and self.lr * self.weight_decay >= 1:
            # decoupled decay multiplies weights by (1 - lr * weight_decay) every step
            raise ValueError(
                f"lr * weight_decay = {self.lr * self.weight_decay:g} would shrink every "
                "weight past zero each step; use a smaller lr or weight_decay"
            )
        return self


class CheckpointConfig(_Section):
    """When to save, how, and which checkpoints to keep.

    ``async`` (field ``async_save``, since ``async`` is a Python keyword): save in the
    background; the training step only waits for a copy of the state into host memory
    (see :meth:`evertrain.checkpoint.CheckpointManager.save_async`). Both spellings are
    accepted on input; dumps use ``async``.
    """

    # validate_by_name: CheckpointConfig(async_save=True) works from Python;
    # serialize_by_alias: the stored config reads like the YAML (checkpoint.async).
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        validate_assignment=True,
        allow_inf_nan=False,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    every_steps: int | None = Field(None, gt=0)
    every_seconds: float | None = Field(None, gt=0)
    keep_last: int = Field(3, ge=1)
    keep_best: int = Field(0, ge=0)
    best_metric: str = "val_loss"
    best_mode: Literal["min", "max"] = "min"
    keep_every_steps: int | None = Field(None, gt=0)
    pinned: list[int] = Field(default_factory=list)  # global_steps never deleted
    min_free_bytes: int = Field(0, ge=0)  # skip (and retry) a save when less is free
    async_save: bool = Field(False, alias="async")  # write checkpoints in the background


class WatchConfig(_Section):
    """The ``evertrain watch`` daemon (see :mod:`evertrain.daemon`): intake, training per
    file, replay, forgetting evaluation, snapshots and status. Ignored by ``evertrain train``.
    """

    epochs_per_file: int = Field(1, gt=0)  # passes over each file's training split
    # share of every micro-batch drawn from earlier files' training rows (0 = off)
    replay_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    replay_window_files: int | None = Field(None, gt=0)  # most recent N earlier files; None = all
    eval_earlier_files: int = Field(8, ge=0)  # held-out loss on the N most recent earlier files
    settle_seconds: float = Field(2.0, ge=0)  # size and mtime unchanged this long = complete
    settle_timeout_seconds: float = Field(3600.0, gt=0)  # still changing after this: rejected
    poll_seconds: float = Field(1.0, gt=0)  # inbox scan interval (also the event fallback)
    max_file_bytes: int = Field(1 << 30, gt=0)  # larger inbox files are rejected unread
    retrain_duplicates: bool = False  # train a file again although identical to a done one
    snapshot_every_files: int | None = Field(None, gt=0)  # after every N trained files
    snapshot_daily_at: str | None = None  # "HH:MM", local time
    snapshot_keep_last: int | None = Field(None, gt=0)  # None = keep every snapshot
    snapshot_merge: bool = False  # also export a merged full model ("consolidation")
    status_every_seconds: float = Field(2.0, gt=0)  # RUN/status.json refresh interval
    retry_seconds: float = Field(30.0, gt=0)  # disk full or read-only: probe and retry this often

    @model_validator(mode="after")
    def _check(self) -> WatchConfig:
        at = self.snapshot_daily_at
        if at is not None:
            hh, sep, mm = at.partition(":")
            if (
                not (sep and hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60)
                or len(mm) != 2
            ):
                raise ValueError(f"snapshot_daily_at must be local time HH:MM, got {at!r}")
        return self


class TrackingConfig(_Section):
    """Options of the experiment trackers ``report_to`` names (see :mod:`evertrain.trackers`)."""

    project: str | None = None  # MLflow experiment / W&B project; None: the run dir's name
    # None: $MLFLOW_TRACKING_URI, else sqlite:///RUN/mlflow.db
    mlflow_tracking_uri: str | None = None
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: `wandb sync` uploads later
    wandb_entity: str | None = None


class RunConfig(_Section):
    """The whole run. ``lora`` absent (``None``) means full fine-tuning."""

    seed: int = 1234
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    # experiment trackers fed the scalars of metrics.jsonl (optional extras)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Dumped only when set: the stored config of a run from before trackers existed
        # reads the same, so its resume reports no config change.
        out = handler(self)
        if isinstance(out, dict):
            if not out.get("report_to"):
                out.pop("report_to", None)
            if out.get("tracking") == TrackingConfig().model_dump():
                out.pop("tracking", None)
        return out  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        s = self.train.schedule
        if self.train.max_steps is not None and s.warmup_steps > self.train.max_steps:
            raise ValueError(
                f"train.schedule.warmup_steps ({s.warmup_steps}) exceeds "
                f"train.max_steps ({self.train.max_steps})"
            )
        self.data._model_kind = self.model.kind
        if self.model.kind == "seq2seq":
            self._check_seq2seq()
        return self

    def _check_seq2seq(self) -> None:
        m, d = self.model, self.data
        if m.source == "smollm2-135m" or m.source.endswith(".gguf"):
            raise ValueError(
                f"model.kind: seq2seq needs model.source tiny or a local Hugging Face "
                f"encoder-decoder directory; {m.source!r} is a causal model"
            )
        if d.format in ("text", "messages", "sharegpt"):
            raise ValueError(
                f"data.format: {d.format!r} has no encoder input for a seq2seq model; use "
                f"prompt_completion records (prompt -> encoder, completion -> decoder)"
            )
        if d.packing_mode != "none":
            # Only an explicit "packing: true" is an error: the default (true, for causal
            # models) gives way, so a seq2seq config need not mention packing at all.
            if "packing" in d.model_fields_set:
                raise ValueError(
                    "data.packing: a seq2seq model trains one prompt/completion pair per "
                    "row; set data.packing: false (or leave it out)"
                )
            d.packing = False

    def to_json(self) -> dict[str, Any]:
        """The resolved config as plain JSON types (what checkpoints store)."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


def _format_error(err: ValidationError, origin: str) -> ConfigError:
    first = err.errors()[0]
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if not first["loc"] and first["type"] == "value_error":
        # RunConfig's cross-section checks name their keys themselves; the input would be
        # the whole config.
        return ConfigError(f"{origin}: {first['ctx']['error']}{more}")
    path = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "value_error":  # pydantic's "Value error, " prefix says nothing
        msg = str(first["ctx"]["error"])
    if first["type"] == "extra_forbidden":
        msg = "unknown key" + suggestion(RunConfig, [str(p) for p in first["loc"]])
    elif "input" in first and first["type"] != "missing":
        msg = f"{msg} (got {first['input']!r})"
    return ConfigError(f"{origin}: {path}: {msg}{more}")


def _to_plain(obj: Any) -> Any:
    # OmegaConf DictConfig/ListConfig: resolve interpolations into plain containers so the
    # config serialises to JSON (Trainer-based setups fail exactly here).
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf  # type: ignore[import-not-found]

        return OmegaConf.to_container(obj, resolve=True)
    return obj


def load_config(
    source: str | Path | dict[str, Any] | Any,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Load and validate a run config.

    Args:
        source: path to a YAML file, a ``dict``, or an OmegaConf ``DictConfig``.
        overrides: ``dotted.key=value`` strings applied before validation.

    Relative ``data.files``, ``model.source``, ``*.cache_dir`` and ``data.chat_template``
    (``.jinja`` file) paths in a YAML file are resolved against the file's directory, so a
    config works from any working directory.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, wrong type or impossible
            combination; the message names the file and the dotted key path.
    """
    base: Path | None = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        try:
            raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}:" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{path}:{where} invalid YAML: {' '.join(what.split())}") from None
        raw = {} if raw is None else raw
        base = path.resolve().parent
    else:
        origin = "config"
        raw = _to_plain(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise _format_error(e, origin) from None
    model = raw.get("model")
    if base is not None and not (isinstance(model, dict) and "source" in model):
        # without it the tiny random test model would train, silently
        raise ConfigError(
            f"{origin}: no model.source; name the model to train (model.source: a model "
            f"directory, a .gguf file, smollm2-135m, or tiny for the random test model)"
        )
    if base is not None:
        cfg.data.files = [
            str((base / f).resolve()) if not Path(f).is_absolute() else f for f in cfg.data.files
        ]
        for section in (cfg.data, cfg.model):
            cache_dir = section.cache_dir
            off = section is cfg.data and (cache_dir or "").strip().lower() == "off"
            if cache_dir and not off and not Path(cache_dir).expanduser().is_absolute():
                section.cache_dir = str((base / cache_dir).resolve())
        tpl = cfg.data.chat_template
        if tpl is not None and is_template_path(tpl) and not Path(tpl).expanduser().is_absolute():
            cfg.data.chat_template = str((base / tpl.strip()).resolve())
        src = cfg.model.source
        if ("/" in src or src.endswith(".gguf")) and not Path(src).is_absolute():
            cfg.model.source = str((base / src).resolve())
    return cfg


def config_from_json(data: dict[str, Any]) -> RunConfig:
    """Rebuild a config stored in a checkpoint (already resolved; no path rewriting)."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise _format_error(e, "stored config") from None
