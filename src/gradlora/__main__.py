"""``python -m gradlora`` is the ``gradlora`` command."""

import sys

from .cli.main import main

sys.exit(main())
