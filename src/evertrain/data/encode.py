"""Tokenisation: turn each :class:`~.formats.Document` into token ids and a loss mask.

Every document becomes ``(ids, mask)``: ``ids`` a list of token ids, ``mask[i]`` True where
token ``i`` is a training target. Rules:

- ``text``: ``[bos] + tokens(text) + [eos]``; every token but ``bos`` is a target.
- ``prompt_completion``: ``[bos] + tokens(prompt) + tokens(completion) + [eos]``; targets are
  the completion tokens and ``eos``. Prompt and completion are tokenised separately and
  concatenated, so the boundary between them is exact for every tokenizer.
- ``messages``: the conversation rendered by ``tokenizer.apply_chat_template`` and tokenised
  with special tokens parsed (as ``apply_chat_template(tokenize=True)`` does). The targets of
  assistant turn ``k`` are the tokens between the rendering of ``messages[:k]`` with the
  generation prompt and the rendering of ``messages[:k+1]``: the reply and the template's
  end-of-turn marker, never the role header. Each prefix is tokenised on its own and its
  boundary placed at the longest common token prefix with the full conversation, so a token
  that straddles a boundary belongs to the later part. Templates whose renderings are not
  prefixes of each other (e.g. ones that rewrite earlier turns) are rejected with a
  :class:`DataError`. ``eos`` is appended unless the last assistant turn (or what follows it)
  already contains it; it is a target when the last message is the assistant's.
- ``data.chat_template`` (a Jinja template, or a ``.jinja`` file) replaces the tokenizer's
  own template: :func:`use_chat_template` sets it on the tokenizer, so it is what
  ``apply_chat_template`` renders and what :func:`tokenizer_identity` (the cache key)
  hashes.
- Tokenizers without a chat template (and no ``data.chat_template``) use the fallback
  template ``"<|{role}|>\\n{content}\\n"`` per message (generation prompt
  ``"<|assistant|>\\n"``), tokenised as literal text, with ``eos`` appended; targets are
  each assistant's ``content + "\\n"`` (and ``eos`` after a final assistant turn). A
  WARNING naming it is logged the first time a process uses it.

Seq2seq models (:meth:`Encoder.encode_seq2seq`, ``prompt_completion`` only): the encoder
input is ``[bos] + tokens(prompt) + [eos]`` (T5's own convention: ``prompt</s>``) and the
decoder target ``tokens(completion) + [eos]``, every target token trained.

``bos`` is added only where the tokenizer adds it itself (``tokenizer("a")`` starts with
``bos_token_id``) and never as a target. Text and prompt/completion strings are tokenised
with ``split_special_tokens=True``: the literal string ``"</s>"`` in a document (an HTML
strike-through tag) must stay text, not become a premature ``eos``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xxhash

from evertrain.config_data import is_template_path
from evertrain.data.errors import DataError
from evertrain.data.formats import Document

log = logging.getLogger("evertrain.data")

FALLBACK_TEMPLATE = "<|{role}|>\n{content}\n"
FALLBACK_GENERATION_PROMPT = "<|assistant|>\n"
_BATCH = 512
# one warning per process (a run) is enough: the daemon builds every file anew
_fallback_warned = False


def _warn_fallback() -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    log.warning(
        "the tokenizer has no chat template: chat data is rendered with evertrain's "
        "built-in template %r per message (generation prompt %r); set data.chat_template "
        "to train with another",
        FALLBACK_TEMPLATE,
        FALLBACK_GENERATION_PROMPT,
    )


def resolve_chat_template(value: str | None) -> str | None:
    """The template text of a ``data.chat_template`` value: the value itself, or the
    content of the ``.jinja`` file it names (see :func:`~evertrain.config_data.is_template_path`).

    Raises:
        DataError: the file is missing, unreadable, not UTF-8 or empty; the template is
            not valid Jinja (names the template's line).
    """
    if value is None:
        return None
    origin = "data.chat_template"
    text = value
    if is_template_path(value):
        path = Path(value.strip()).expanduser()
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(
                "chat template file not found (check data.chat_template)", file=origin
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the chat template: {e}", file=origin) from None
        if not text.strip():
            raise DataError("empty chat template file (data.chat_template)", file=origin)
    _check_jinja(text, origin)
    return text


def _check_jinja(text: str, origin: str) -> None:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # the environment transformers renders chat templates in, less its own
    # {% generation %} tag (a template using it is left to transformers to judge)
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as e:
        if "generation" in str(e.message):
            return
        raise DataError(
            f"invalid Jinja chat template (data.chat_template): {e.message} at template "
            f"line {e.lineno}",
            file=origin,
        ) from None


def use_chat_template(tokenizer: Any, value: str | None) -> None:
    """Set ``data.chat_template`` (``value``; None: leave the tokenizer as it is) on
    ``tokenizer``, in place of its own template.

    Raises:
        DataError: see :func:`resolve_chat_template`.
    """
    text = resolve_chat_template(value)
    if text is not None:
        tokenizer.chat_template = text


Encoded = tuple[list[int], list[bool]]
Seq2SeqEncoded = tuple[list[int], list[int]]  # (encoder input ids, decoder target ids)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Encoder:
    """Tokenises documents for one tokenizer (see the module docstring for the rules).

    Attributes:
        eos_id: appended to every document.
        pad_id: ``tokenizer.pad_token_id``, or ``eos_id`` when the tokenizer has no pad token
            (pads are never attended to nor targets, so the id only has to be valid).
        bos_id: prepended to text and prompt/completion documents, or ``None``.

    Raises:
        ValueError: the tokenizer has no ``eos_token_id``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no eos_token_id; documents need an "
                "end-of-sequence token (set tokenizer.eos_token)"
            )
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        bos = tokenizer.bos_token_id
        probe = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        self.bos_id: int | None = int(bos) if bos is not None and probe[:1] == [bos] else None
        self.chat_template = getattr(tokenizer, "chat_template", None) or None

    # ------------------------------------------------------------------ tokenising

    def _fast_backend(self) -> Any:
        # The Rust tokenizer behind a fast tokenizer, when calling it directly gives the ids
        # the tokenizer's __call__ gives: no truncation or padding configured (__call__ turns
        # them off). Its encode_batch_fast skips the character offsets and transformers'
        # per-encoding conversion that __call__ pays for: 1.6x the bytes per second on
        # SmolLM2's tokenizer (bench/bench_tokenize.py), the same ids (tests compare them).
        backend = getattr(self.tok, "backend_tokenizer", None)
        if (
            backend is None
            or not hasattr(backend, "encode_batch_fast")
            or not hasattr(backend, "encode_special_tokens")
            or backend.truncation is not None
            or backend.padding is not None
        ):
            return None
        return backend

    def _tokenize(self, texts: list[str], *, literal: bool) -> list[list[int]]:
        out: list[list[int]] = []
        backend = self._fast_backend()
        for i in range(0, len(texts), _BATCH):
            if backend is not None:
                # what __call__'s split_special_tokens sets (and leaves set)
                backend.encode_special_tokens = literal
                fast = backend.encode_batch_fast(texts[i : i + _BATCH], add_special_tokens=False)
                out.extend(e.ids for e in fast)
                continue
            enc = self.tok(
                texts[i : i + _BATCH], add_special_tokens=False, split_special_tokens=literal
            )["input_ids"]
            out.extend(list(map(int, x)) for x in enc)
        return out

    def encode(self, docs: Sequence[Document]) -> list[Encoded]:
        """``(ids, mask)`` for each document, in order.

        Raises:
            DataError: a conversation the chat template cannot render (or renders
                inconsistently); the message names file and line.
        """
        plain: list[str] = []
        for d in docs:
            if d.kind == "text":
                plain.append(d.text or "")
            elif d.kind == "prompt_completion":
                plain.extend((d.prompt or "", d.completion or ""))
        toks = iter(self._tokenize(plain, literal=True))
        head = [self.bos_id] if self.bos_id is not None else []
        out: list[Encoded] = []
        for d in docs:
            if d.kind == "text":
                ids = next(toks)
                out.append(
                    (head + ids + [self.eos_id], [False] * len(head) + [True] * (len(ids) + 1))
                )
            elif d.kind == "prompt_completion":
                p, c = next(toks), next(toks)
                out.append(
                    (
                        head + p + c + [self.eos_id],
                        [False] * (len(head) + len(p)) + [True] * (len(c) + 1),
                    )
                )
            else:
                out.append(self._encode_chat(d))
        return out

    def encode_seq2seq(self, docs: Sequence[Document]) -> list[Seq2SeqEncoded]:
        """``(encoder ids, target ids)`` for each ``prompt_completion`` document, in order.

        Raises:
            DataError: a document of another format (names its file and line).
        """
        for d in docs:
            if d.kind != "prompt_completion":
                raise DataError(
                    f"{d.kind!r} records have no encoder input for a seq2seq model "
                    f"(model.kind: seq2seq); use prompt_completion records",
                    file=d.file,
                    line=d.line,
                    unit=d.unit,
                )
        toks = iter(
            self._tokenize(
                [s for d in docs for s in (d.prompt or "", d.completion or "")], literal=True
            )
        )
        head = [self.bos_id] if self.bos_id is not None else []
        out: list[Seq2SeqEncoded] = []
        for _ in docs:
            p, c = next(toks), next(toks)
            out.append((head + p + [self.eos_id], c + [self.eos_id]))
        return out

    # ------------------------------------------------------------------ chat

    def _render(self, doc: Document, msgs: Sequence[tuple[str, str]], gen: bool) -> str:
        if self.chat_template is None:
            _warn_fallback()
            body = "".join(FALLBACK_TEMPLATE.format(role=r, content=c) for r, c in msgs)
            return body + (FALLBACK_GENERATION_PROMPT if gen else "")
        try:
            out = self.tok.apply_chat_template(
                [{"role": r, "content": c} for r, c in msgs],
                tokenize=False,
                add_generation_prompt=gen,
            )
        except Exception as e:  # jinja's raise_exception and template bugs alike
            raise DataError(
                f"the tokenizer's chat template cannot render this conversation: {e}",
                file=doc.file,
                line=doc.line,
                unit=doc.unit,
                field="messages",
            ) from None
        if not isinstance(out, str):
            raise DataError(
                f"apply_chat_template returned {type(out).__name__}, not str",
                file=doc.file,
                line=doc.line,
                unit=doc.unit,
                field="messages",
            )
        return out

    def _encode_chat(self, doc: Document) -> Encoded:
        msgs = doc.messages or ()
        literal = self.chat_template is None
        full = self._render(doc, msgs, False)
        ids = self._tokenize([full], literal=literal)[0]
        mask = [False] * len(ids)
        last_start = 0
        for k, (role, _) in enumerate(msgs):
            if role != "assistant":
                continue
            pre = self._render(doc, msgs[:k], True)
            post = self._render(doc, msgs[: k + 1], False)
            if not (post.startswith(pre) and full.startswith(post)):
                raise DataError(
                    f"the chat template is not prefix-stable at messages[{k}] (rendering the "
                    "conversation up to a turn is not a prefix of rendering all of it), so the "
                    "assistant tokens cannot be located",
                    file=doc.file,
                    line=doc.line,
                    unit=doc.unit,
                    field=f"messages[{k}]",
                    hint="use a template that renders earlier turns unchanged",
                )
            pre_ids, post_ids = self._tokenize([pre, post], literal=literal)
            a, b = _lcp(pre_ids, ids), _lcp(post_ids, ids)
            mask[a:b] = [True] * (b - a)
            last_start = a
        head: list[int] = []
        if literal and self.bos_id is not None:
            head = [self.bos_id]
        if self.eos_id not in ids[last_start:]:
            ids.append(self.eos_id)
            mask.append(msgs[-1][0] == "assistant")
        return head + ids, [False] * len(head) + mask


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """JSON-able identity of a tokenizer's behaviour, for cache keys.

    Covers the class, name, vocabulary (hashed), special tokens, chat template, the fast
    tokenizer's full pipeline JSON where there is one, and the transformers version.
    """
    import transformers

    def h(obj: Any) -> str:
        text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
        return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "len": len(tokenizer),
        "vocab": h(sorted(tokenizer.get_vocab().items())),
        "init_kwargs": h(getattr(tokenizer, "init_kwargs", {})),
        "pipeline": h(backend.to_str()) if backend is not None else None,
        "special_tokens": h(tokenizer.special_tokens_map),
        "chat_template": h(getattr(tokenizer, "chat_template", None)),
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "transformers": transformers.__version__,
    }
