"""``python -m jupyter_mlops.tracking SPOOL_DIR``: the background uploader (see flusher.py)."""

import sys

from .flusher import main

sys.exit(main())
