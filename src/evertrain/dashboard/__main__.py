"""``python -m evertrain.dashboard RUN [--host H] [--port P]``: what ``start_ui_process`` runs."""

import sys

from evertrain.dashboard.server import main

if __name__ == "__main__":
    sys.exit(main())
