"""``python -m gradlora`` is the ``gradlora`` command."""

import sys

from .cli import main

sys.exit(main())
