"""The daemon's own error, and which errors belong to the run rather than to one file.

A bad file must never stop the daemon: an error while a file is validated, tokenised or
trained rejects that file and the daemon goes on (:mod:`evertrain.daemon.files`). Errors
of the run itself are the exception: rejecting the file at hand would not help, since every
later file would fail the same way (and a checkpoint that cannot be written must not be
taken for a bad file); those stop the daemon with their message.
"""

from __future__ import annotations

import errno
import sqlite3

from evertrain.checkpoint.errors import CheckpointError


class DaemonError(RuntimeError):
    """The daemon cannot go on safely (the message says why and what to do)."""


# The disk under the run directory, not a file's content: full, over quota, read-only,
# failing, or the process out of file descriptors.
RUN_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE}
)


def is_run_error(e: BaseException) -> bool:
    """True for an error of the run rather than of the file being processed: the daemon's
    own (:class:`DaemonError`, which includes reconcile errors), the ledger's
    (``sqlite3.Error``), a checkpoint's (the save is what marks files done), and OS errors
    of the disk (:data:`RUN_ERRNOS`), also when they are the direct cause of another."""
    for err in (e, e.__cause__):
        if isinstance(err, (DaemonError, sqlite3.Error, CheckpointError)):
            return True
        if isinstance(err, OSError) and err.errno in RUN_ERRNOS:
            return True
    return False
