"""Uploads into ``RUN/inbox/``: name checks, size limit, write-then-rename.

A file is written as ``inbox/.upload-<random>-<name>.part`` (a name the daemon ignores,
docs/run-directory.md) and published by a hard link to ``inbox/<name>``, which fails
instead of replacing a file already there, then the temporary name is removed. So the
daemon never picks up half a file, and an upload never overwrites a file waiting in the inbox.
"""

from __future__ import annotations

import os
import re
import secrets
import unicodedata
from pathlib import Path

DEFAULT_MAX_UPLOAD_BYTES = 1 << 30  # 1 GiB: larger files are copied into inbox/ directly
MAX_NAME_BYTES = 200  # leaves room for the daemon's "<id>-" prefix within NAME_MAX (255)
# Letters/digits of any script, then letters, digits, space and . _ - + ( ) , = @
_NAME_RE = re.compile(r"[^\W_][\w .+(),=@-]*", re.UNICODE)


class UploadError(Exception):
    """An upload refused; ``status`` is the HTTP status to answer with (400, 409, 413, 507)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def data_extensions() -> tuple[str, ...]:
    """File extensions the data pipeline reads (``evertrain.data.records.EXTENSIONS``)."""
    from evertrain.data.records import EXTENSIONS

    return tuple(sorted(EXTENSIONS))


def check_name(name: str, extensions: tuple[str, ...]) -> str:
    """``name`` if it is a safe inbox file name, else raise :class:`UploadError` (400).

    Refused, each with its own message: a path (``/``, ``\\``, ``..`` components), empty or
    longer than 200 UTF-8 bytes, control characters, a leading dot or a ``.part``/``.tmp``
    suffix (names the daemon treats as incomplete and never reads), characters other than
    letters, digits, space and ``. _ - + ( ) , = @``, and an extension the data pipeline
    cannot read. Names are NFC-normalised first (macOS sends decomposed accents).
    """
    name = unicodedata.normalize("NFC", name)
    hint = "send just the file's name, e.g. 'notes-2024.jsonl'"
    if not name:
        raise UploadError(400, f"upload refused: the file name is empty; {hint}")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise UploadError(
            400,
            f"upload refused: {name!r} is a path, not a file name; uploads only go "
            f"directly into the run's inbox/; {hint}",
        )
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise UploadError(400, f"upload refused: {name!r} contains control characters; {hint}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise UploadError(
            400, f"upload refused: the file name is longer than {MAX_NAME_BYTES} bytes; shorten it"
        )
    if name.startswith("."):
        raise UploadError(
            400,
            f"upload refused: {name!r} starts with '.', which marks files the daemon "
            "ignores (hidden or still being written); rename it",
        )
    if name.lower().endswith((".part", ".tmp")):
        raise UploadError(
            400,
            f"upload refused: {name!r} ends in .part/.tmp, which marks files still being "
            "written (the daemon ignores them); rename it",
        )
    if not _NAME_RE.fullmatch(name) or name != name.strip() or name.endswith("."):
        raise UploadError(
            400,
            f"upload refused: {name!r}: use letters, digits, spaces and . _ - + ( ) , = @ "
            "only, starting with a letter or digit and not ending in a space or dot",
        )
    ext = os.path.splitext(name)[1].lower()
    if ext not in extensions:
        raise UploadError(
            400,
            f"upload refused: {name!r}: the extension {ext or '(none)'} is not a data format "
            f"evertrain reads; use one of {', '.join(extensions)}",
        )
    return name


class InboxUpload:
    """One upload being written into ``inbox``; use :meth:`write` then :meth:`commit`,
    and :meth:`abort` on any failure (removes the temporary file).

    Args:
        inbox: the run's ``inbox/`` directory (created if missing: the user owns it).
        name: a name already accepted by :func:`check_name`.
        max_bytes: size limit in bytes; :meth:`write` raises ``UploadError(413)`` past it.
        expected_bytes: the request's Content-Length if known: refused up front when over
            ``max_bytes`` (413), or when the file system has less room (507).

    Raises:
        UploadError: 409 if ``inbox/<name>`` exists, 413/507 as above.
    """

    def __init__(
        self, inbox: Path, name: str, max_bytes: int, expected_bytes: int | None = None
    ) -> None:
        self.inbox, self.name, self.max_bytes = Path(inbox), name, max_bytes
        self.final = self.inbox / name
        if expected_bytes is not None and expected_bytes > max_bytes:
            raise UploadError(413, self._too_big(expected_bytes))
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._exists_check()
        if expected_bytes is not None:
            free = _free_bytes(self.inbox)
            if expected_bytes > free:
                raise UploadError(
                    507,
                    f"upload refused: {name!r} is {expected_bytes} bytes but the run "
                    f"directory's file system has {free} bytes free",
                )
        self.tmp = self.inbox / f".upload-{secrets.token_hex(6)}-{name}.part"
        self._f = open(self.tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        self.size = 0

    def _too_big(self, n: int | str) -> str:
        return (
            f"upload refused: {self.name!r} is {n} bytes, over the dashboard's limit of "
            f"{self.max_bytes} bytes (evertrain ui --max-upload-mb); copy larger files "
            f"into {self.inbox} directly (as NAME.part, then rename)"
        )

    def _exists_check(self) -> None:
        if os.path.lexists(self.final):
            raise UploadError(
                409,
                f"upload refused: {self.name!r} is already waiting in the inbox; rename "
                "the file or wait until the daemon has taken it",
            )

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; raises ``UploadError(413)`` once the total passes the limit."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise UploadError(413, self._too_big(f"more than {self.max_bytes}"))
        self._f.write(chunk)

    def commit(self) -> Path:
        """fsync and publish as ``inbox/<name>``; returns that path.

        Raises:
            UploadError: 409 if a file of that name appeared meanwhile (nothing replaced).
        """
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        try:
            os.link(self.tmp, self.final)  # fails if the name exists: never replaces
        except FileExistsError:
            self.abort()
            self._exists_check()
            raise
        self.tmp.unlink()
        fd = os.open(self.inbox, os.O_RDONLY)
        try:
            os.fsync(fd)  # the new name survives a power cut once we answer 201
        finally:
            os.close(fd)
        return self.final

    def abort(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
