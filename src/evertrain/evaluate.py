"""Evaluation for people: held-out loss and perplexity plus greedy sample generations,
written as a report into the run directory.

- :func:`evaluate_run`: ``evertrain eval``: a run's checkpoint (or, with a config, the
  untrained model a run starts from), on the held-out split of its data.
- :func:`evaluate_trainer`: for a live :class:`evertrain.trainer.Trainer` (the daemon calls
  it at the end of its main job); draws no random numbers and leaves the model in the mode
  it found it, so training can continue bit-exactly afterwards.
- :func:`write_eval_report`: ``RUN/eval/step-<N>.json`` and ``RUN/eval/step-<N>.txt``.

The held-out loss is computed exactly as :meth:`evertrain.trainer.Trainer.evaluate` does:
the split's rows in order, ``train.micro_batch_size`` at a time (at most
``train.eval_max_batches`` batches), the summed token cross-entropy (nats) of all batches
divided by their labelled tokens (after the causal shift; every label for ``model.kind:
seq2seq``, see :func:`evertrain.data.target_tokens`); perplexity is ``exp(loss)``. So the report of
step N equals the ``eval`` line the trainer logged at step N. A seq2seq model's
generations are the decoder's output for the prompt as encoder input.

Report JSON (``format_version`` 1): ``{"format_version", "label", "global_step",
"checkpoint" (path or null), "model": {"base": identity, "lora": {...} | null, "dtype"},
"val_loss" (nats/token or null), "val_ppl", "val_rows", "val_tokens" (labelled tokens
scored), "eval_max_batches", "generations": [{"prompt", "completion", "new_tokens"}],
"max_new_tokens", "chat" (prompts rendered with the chat template), "seconds", "time"
(unix s), "files"}``. ``files`` is ``[]`` except for a watch daemon's run: then one entry
per file the checkpoint trained on, ``{"id", "name", "val_loss", "val_ppl", "val_rows",
"val_tokens"}`` (``val_loss`` null for a file without held-out rows), and the top-level
``val_loss`` is their token-weighted mean (each file's summed loss over all their scored
tokens), so it equals one pass over the union of the files' held-out rows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evertrain import precision as precision_lib
from evertrain.checkpoint.format import step_dir_name
from evertrain.config import RunConfig
from evertrain.data.pack import target_tokens
from evertrain.step import loss_totals
from evertrain.train_settings import token_loss_sum

# Beginnings in the style of CPython's reference documentation (the main job's data), so
# the change a pydoc fine-tune makes is visible; override with --prompt.
DEFAULT_PROMPTS: tuple[str, ...] = (
    'The "while" statement\n*********************\n\n',
    'The "for" statement is used to',
    "Lambda expressions (sometimes called lambda forms) are used to",
)
DEFAULT_MAX_NEW_TOKENS = 48
REPORT_DIR = "eval"


@dataclass
class Generation:
    """One greedy continuation: ``new_tokens`` tokens decoded into ``completion``."""

    prompt: str
    completion: str
    new_tokens: int


@dataclass
class EvalReport:
    """Result of one evaluation (see the module docstring for the JSON form)."""

    global_step: int
    val_loss: float | None
    val_ppl: float | None
    val_rows: int
    val_tokens: int
    generations: list[Generation] = field(default_factory=list)
    label: str = ""
    checkpoint: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    eval_max_batches: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    chat: bool = False
    seconds: float = 0.0
    time: float = 0.0
    files: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": 1, **asdict(self)}

    def to_text(self) -> str:
        """The report as readable text (what ``RUN/eval/step-<N>.txt`` holds)."""
        base = self.model.get("base", {})
        lora = self.model.get("lora")
        lines = [
            f"evertrain eval: {self.label}, global_step {self.global_step}",
            f"checkpoint: {self.checkpoint or '(none: the untrained model)'}",
            f"base model: {base.get('source')} ({base.get('format')}, {base.get('model_type')})"
            f", dtype {self.model.get('dtype')}"
            + (f", LoRA r={lora['r']} alpha={lora['alpha']}" if lora else ", full weights"),
        ]
        if self.val_loss is None:
            lines.append(
                "held-out: no held-out data (no data.files nor trained watch files, or "
                "data.val_fraction is 0 or too small for any document)"
            )
        else:
            lines.append(
                f"held-out: loss {self.val_loss:.4f} nats/token, perplexity {self.val_ppl:.2f}"
                f" ({self.val_tokens} tokens in {self.val_rows} rows"
                + (
                    f", first {self.eval_max_batches} batches"
                    if self.eval_max_batches is not None
                    else ""
                )
                + ")"
                + (f", token-weighted over {len(self.files)} file(s)" if self.files else "")
            )
        for f in self.files:
            lines.append(
                f"  file #{f['id']} {f['name']}: "
                + (
                    "no held-out rows"
                    if f["val_loss"] is None
                    else f"loss {f['val_loss']:.4f}, perplexity {f['val_ppl']:.2f} "
                    f"({f['val_tokens']} tokens in {f['val_rows']} rows)"
                )
            )
        lines.append(
            f"greedy generations ({self.max_new_tokens} new tokens max"
            + (", chat template" if self.chat else "")
            + "):"
        )
        for i, g in enumerate(self.generations, 1):
            lines += [f"--- {i}. prompt ---", g.prompt, f"--- {i}. continuation ---", g.completion]
        lines.append(f"({self.seconds:.1f} s)")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pieces


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # eval(): no dropout, so evaluation draws nothing from the training RNG; the previous
    # mode is restored so a trainer continues exactly as it would have.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def heldout_loss(
    model: torch.nn.Module,
    dataset: Any,
    *,
    micro_batch_size: int,
    max_batches: int | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
    kind: str = "causal",
    trim_padding: bool = False,
) -> tuple[float | None, int, int]:
    """Token-weighted mean cross-entropy over ``dataset`` (see the module docstring).

    Args:
        model: a causal LM (or, ``kind="seq2seq"``, an encoder-decoder) taking
            ``input_ids``, ``labels``, ``attention_mask``.
        dataset: rows of ``{"input_ids", "labels", "attention_mask"}``, each
            ``long [seq_len]`` (a :class:`evertrain.data.TokenizedDataset`).
        micro_batch_size: rows per forward pass.
        max_batches: score only the first this many batches.
        device: where the model is (default: its first parameter's device).
        precision: ``"bf16"`` runs under bfloat16 autocast, as training does.
        kind: ``model.kind``: which labels count as scored tokens.
        trim_padding: cut each batch's trailing all-padding columns, as the run's training
            did (:func:`evertrain.batching.trim_for_resume`).

    Returns:
        ``(loss in nats/token or None when no token was scored, rows scored, tokens
        scored)``.
    """
    dev = next(model.parameters()).device if device is None else device
    resolved = precision_lib.resolve(precision, dev)  # "auto": probed once, not per batch
    with _eval_mode(model):
        total, count, rows = loss_totals(
            model,
            dataset,
            loss_fn=functools.partial(token_loss_sum, kind=kind),
            count_targets=lambda batch: target_tokens(batch["labels"], kind),
            micro_batch_size=micro_batch_size,
            max_batches=max_batches,
            device=dev,
            autocast=lambda: precision_lib.autocast(dev, resolved),
            trim=trim_padding,
        )
    if count == 0:
        return None, rows, 0
    return total / count, rows, count


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool, kind: str = "causal") -> list[int]:
    """Token ids of ``prompt`` as training tokenised its documents (see
    :mod:`evertrain.data.encode`): ``[bos] + tokens`` for text; for chat data the prompt
    as one user turn followed by the template's generation prompt; for a seq2seq model
    the encoder input ``[bos] + tokens + [eos]``."""
    from evertrain.data.encode import FALLBACK_GENERATION_PROMPT, FALLBACK_TEMPLATE, Encoder
    from evertrain.data.formats import Document

    enc = Encoder(tokenizer)
    if kind == "seq2seq":
        doc = Document("", 0, "line", "prompt_completion", prompt=prompt, completion=".")
        return enc.encode_seq2seq([doc])[0][0]
    if chat:
        if enc.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        text = FALLBACK_TEMPLATE.format(role="user", content=prompt) + FALLBACK_GENERATION_PROMPT
    else:
        text = prompt
    head = [enc.bos_id] if enc.bos_id is not None else []
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return head + list(ids)


def generate_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = False,
    device: torch.device | None = None,
    kind: str = "causal",
) -> list[Generation]:
    """Greedy continuations (``do_sample=False``: deterministic, no RNG) of each prompt.

    Generation stops at the tokenizer's eos or after ``max_new_tokens`` tokens; special
    tokens are dropped from the decoded text. ``kind="seq2seq"``: the prompt is the
    encoder input and the completion what the decoder generates.
    """
    from transformers import GenerationConfig

    from evertrain.models import unwrap

    if device is None:
        device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # A fresh config: the model's own generation_config may ask for sampling.
    gen_cfg = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos
    )
    # the decoder's output starts with its start token, not with the prompt
    skip: int | None = None
    if kind == "seq2seq":
        start = getattr(unwrap(model).config, "decoder_start_token_id", None)
        gen_cfg.decoder_start_token_id = pad if start is None else start
        skip = 1
    out = []
    with _eval_mode(model), torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([_prompt_ids(tokenizer, prompt, chat, kind)], device=device)
            seq = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg
            )
            new = seq[0, ids.shape[1] if skip is None else skip :].tolist()
            text = tokenizer.decode(new, skip_special_tokens=True)
            out.append(Generation(prompt=prompt, completion=text, new_tokens=len(new)))
    return out


def evaluate_model(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    global_step: int,
    micro_batch_size: int,
    max_batches: int | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = False,
    precision: str = "fp32",
    model_info: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    label: str | None = None,
    kind: str = "causal",
    trim_padding: bool = False,
) -> EvalReport:
    """Held-out loss of ``model`` on ``dataset`` (None: skipped) and greedy generations.

    ``kind``: ``model.kind`` (``"causal"`` or ``"seq2seq"``). Draws no random numbers; the
    model's train/eval mode is restored afterwards.
    """
    t0 = time.perf_counter()
    loss, rows, tokens = (None, 0, 0)
    if dataset is not None and len(dataset):
        loss, rows, tokens = heldout_loss(
            model,
            dataset,
            micro_batch_size=micro_batch_size,
            max_batches=max_batches,
            precision=precision,
            kind=kind,
            trim_padding=trim_padding,
        )
    gens = generate_samples(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat, kind=kind
    )
    return EvalReport(
        global_step=global_step,
        val_loss=loss,
        val_ppl=None if loss is None else math.exp(min(loss, 50.0)),
        val_rows=rows,
        val_tokens=tokens,
        generations=gens,
        label=label or step_dir_name(global_step),
        checkpoint=checkpoint,
        model=model_info or {},
        eval_max_batches=max_batches,
        max_new_tokens=max_new_tokens,
        chat=chat,
        seconds=time.perf_counter() - t0,
        time=time.time(),
    )


def write_eval_report(run_dir: str | Path, report: EvalReport) -> tuple[Path, Path]:
    """Write ``RUN/eval/step-<N>.json`` and ``.txt`` (each atomically; a report of the
    same step is replaced: it is derived data).

    Returns:
        ``(json_path, text_path)``.

    Raises:
        OSError: the run directory is not writable.
    """
    from evertrain.fsutil import atomic_write_bytes

    out = Path(run_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = step_dir_name(report.global_step)
    jpath, tpath = out / f"{stem}.json", out / f"{stem}.txt"
    blob = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(jpath, blob.encode("utf-8"))
    atomic_write_bytes(tpath, report.to_text().encode("utf-8"))
    return jpath, tpath


# --------------------------------------------------------------------------- entry points


def is_chat(report: Any) -> bool:
    """Whether a data report holds chat (``messages``) data: render prompts as a chat."""
    return any(f.format == "messages" for f in getattr(report, "files", []))


def _model_info(cfg: Any, identity: dict[str, Any]) -> dict[str, Any]:
    lora = cfg.lora.model_dump() if cfg.lora is not None else None
    return {"base": identity, "lora": lora, "dtype": cfg.model.dtype}


def evaluate_trainer(
    trainer: Any,
    cfg: RunConfig,
    *,
    dataset: Any = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool | None = None,
    write: bool = True,
) -> EvalReport:
    """Evaluate a live trainer's model at its current global_step (the daemon's hook).

    Args:
        trainer: an :class:`evertrain.trainer.Trainer` built from ``cfg``.
        cfg: the run config (model description and chat rendering).
        dataset: held-out rows; default ``trainer.val_ds`` (None when the trainer has no
            data of its own: then only generations are made).
        prompts: prompts for the greedy generations.
        max_new_tokens: tokens generated per prompt at most.
        chat: render prompts with the chat template; default: when the trainer's data is
            chat (``messages``) data.
        write: also write the report into ``trainer.run_dir`` (:func:`write_eval_report`).

    Draws no random numbers and restores the model's train/eval mode, so training may
    continue bit-exactly afterwards.
    """
    ds = dataset if dataset is not None else getattr(trainer, "val_ds", None)
    if chat is None:
        chat = cfg.data.format == "messages"
    last = trainer.checkpoints.committed()
    at_step = [i for i in last if i.global_step == trainer.progress.global_step]
    report = evaluate_model(
        trainer.model,
        trainer.tokenizer,
        ds,
        global_step=trainer.progress.global_step,
        micro_batch_size=cfg.train.micro_batch_size,
        max_batches=cfg.train.eval_max_batches,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        chat=chat,
        precision=cfg.train.precision,
        model_info=_model_info(cfg, trainer.owners[trainer.model_owner].identity),
        checkpoint=str(at_step[0].path) if at_step else None,
        kind=cfg.model.kind,
        trim_padding=trainer.settings.trim_padding,
    )
    if write:
        write_eval_report(trainer.run_dir, report)
    return report


def evaluate_run(
    run_dir: str | Path,
    *,
    step: int | None = None,
    config: Any = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    write: bool = True,
) -> EvalReport:
    """Evaluate checkpoint ``step`` of ``run_dir`` (default: the newest), or with
    ``config`` the untrained model a run with that config starts from (global_step 0;
    with LoRA that is the base model, since a fresh adapter's ``lora_B`` is zero).

    The held-out split is rebuilt from the data section of the checkpoint's stored config
    (or of ``config``), with its seed, so it is the split training held out. A watch
    daemon's checkpoint (no ``data.files``) is scored on the held-out split of every file
    it trained on (finished or in flight), each rebuilt from ``RUN/processed/`` as the
    daemon split it, per file and token-weighted overall (the report's ``files``); a
    config without ``data.files`` gets generations only.

    Args:
        run_dir: the run directory; the report is written into ``run_dir/eval/``.
        step: global_step of the checkpoint; not together with ``config``.
        config: a :class:`evertrain.config.RunConfig`, or a path to a YAML config.
        prompts: prompts for the greedy generations.
        max_new_tokens: tokens generated per prompt at most.
        write: write the report (:func:`write_eval_report`).

    Raises:
        ValueError: both ``step`` and ``config`` given.
        FileNotFoundError: no run directory / checkpoints / checkpoint of ``step``.
        evertrain.checkpoint.CheckpointError: the checkpoint is damaged (refused).
        evertrain.data.DataError: the data files are gone or changed beyond use (for a
            watch run: a trained file is missing from the run directory or was edited).
        evertrain.daemon.LedgerError: a watch run's ledger cannot be read.
        evertrain.state.StateError, evertrain.models.ModelSourceError: the base model
            cannot be rebuilt as trained.
    """
    from evertrain.config import load_config
    from evertrain.data import build_datasets
    from evertrain.restore import preserved_rng, restore_model

    if step is not None and config is not None:
        raise ValueError("give a checkpoint step or a config, not both")
    if config is not None:
        from evertrain.models import load_model
        from evertrain.rng import seed_everything

        cfg = config if isinstance(config, RunConfig) else load_config(config)
        with preserved_rng():
            seed_everything(cfg.seed)
            loaded = load_model(cfg.model, cfg.lora)
        model, tok, identity, global_step, ckpt = (
            loaded.model,
            loaded.tokenizer,
            loaded.identity,
            0,
            None,
        )
    else:
        restored = restore_model(run_dir, step)
        cfg, model, tok = restored.config, restored.model, restored.tokenizer
        identity, global_step = restored.identity, restored.global_step
        ckpt = str(restored.checkpoint)
    from evertrain.batching import trim_for_resume
    from evertrain.distributed import resolve_device

    # held-out batches cut as the checkpoint's training cut them (the same val_loss)
    trim = trim_for_resume(cfg, None if config is not None else restored.summary)

    model.to(resolve_device(cfg.train.device))
    from evertrain.data.encode import use_chat_template

    # the samples' prompts are rendered as training rendered its chat data
    use_chat_template(tok, cfg.data.chat_template)
    val, data_report = None, None
    stream = None if config is not None else restored.states.get("stream")
    if cfg.data.files:
        _, val, data_report = build_datasets(cfg.data, tok, cfg.seed, default_cache=True)
    elif stream is not None:  # a watch daemon's run trains on inbox files, not on data.files
        from evertrain.evaluate_watch import evaluate_watch_run

        return evaluate_watch_run(
            run_dir,
            stream,
            cfg,
            model,
            tok,
            global_step=global_step,
            prompts=prompts,
            max_new_tokens=max_new_tokens,
            model_info=_model_info(cfg, identity),
            checkpoint=ckpt,
            write=write,
            trim_padding=trim,
        )
    report = evaluate_model(
        model,
        tok,
        val,
        global_step=global_step,
        micro_batch_size=cfg.train.micro_batch_size,
        max_batches=cfg.train.eval_max_batches,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        chat=is_chat(data_report),
        precision=cfg.train.precision,
        model_info=_model_info(cfg, identity),
        checkpoint=ckpt,
        label="untrained (config)" if config is not None else None,
        kind=cfg.model.kind,
        trim_padding=trim,
    )
    if write:
        write_eval_report(run_dir, report)
    return report
