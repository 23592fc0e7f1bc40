"""``python -m jupyter_mlops ...`` is ``jupyter mlops ...`` (used where the scheduler starts runs)."""

import sys

from .cli import main

sys.exit(main())
