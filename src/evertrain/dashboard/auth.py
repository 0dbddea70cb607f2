"""The dashboard's access token and who must present it.

Rules (issue 5):

- The token is created on first use as ``RUN/ui-token`` (mode 0600, owner only) and printed
  once, when created; later the owner reads it from that file.
- Every state-changing request (POST/PUT/PATCH/DELETE) needs it on any address, in a header
  (``Authorization: Bearer <token>`` or ``X-Evertrain-Token``). A cookie is not accepted
  there: browsers attach cookies to cross-site form posts, which would let any web page the
  user visits pause training (CSRF).
- Bound to a non-loopback address, every request needs it: header, the cookie the page
  sets, or ``?token=`` (the page's login link; it is swapped for the cookie by a redirect so
  it leaves the address bar and history).
- Bound to loopback, requests must name a loopback host in ``Host``: a page on
  evil.example whose DNS name is rebound to 127.0.0.1 would otherwise read the dashboard.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from pathlib import Path

TOKEN_FILE = "ui-token"
_LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost")


class TokenError(Exception):
    """RUN/ui-token is unusable (wrong permissions, not a file, too short)."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def load_or_create_token(run_dir: Path) -> tuple[str, bool]:
    """(token, created): read ``RUN/ui-token`` or create it (mode 0600, 43 URL-safe chars).

    Raises:
        TokenError: the file is readable by group/others (it would let them control the
            run), not a regular file, or holds fewer than 32 characters.
    """
    path = Path(run_dir) / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_token(path), False
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, True


def _read_token(path: Path) -> str:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise TokenError(f"{path}: not a regular file; remove it and restart `evertrain ui`")
    if st.st_mode & 0o077:
        raise TokenError(
            f"{path}: readable or writable by group/others (mode {stat.filemode(st.st_mode)}); "
            f"anyone who reads it can control the run. Run `chmod 600 {path}` (or delete it "
            "to get a new token)"
        )
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 32:
        raise TokenError(
            f"{path}: holds {len(token)} characters, fewer than 32; delete it to get a new token"
        )
    return token


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison (no timing side channel on the token's prefix)."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def host_is_loopback_name(host_header: str | None) -> bool:
    """Whether an HTTP ``Host`` header names this machine (``127.0.0.1:8765``, ``[::1]``,
    ``localhost``); used against DNS rebinding when bound to loopback."""
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return is_loopback(host)
