"""The web dashboard of a run: ``evertrain ui RUN`` (see ``docs/run-directory.md``).

A separate process that reads the run directory and writes only ``control.json``,
``inbox/`` uploads and ``ui-token``, so it works while the daemon is stopped and a crash of
one never affects the other. Public API:

- :func:`serve`: run the dashboard in this process until interrupted.
- :func:`start_ui_process`: run it as a child process (``evertrain watch --ui``).
- :func:`evertrain.dashboard.app.create_app`: the Starlette application (tests, embedding).

Importing this package loads neither Starlette nor torch, so the daemon can call
:func:`start_ui_process` cheaply.
"""

from evertrain.dashboard.server import DashboardError, serve, start_ui_process

__all__ = ["DashboardError", "serve", "start_ui_process"]
