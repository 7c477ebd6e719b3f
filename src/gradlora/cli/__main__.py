"""``python -m gradlora.cli`` (and ``torchrun -m gradlora.cli``) is the ``gradlora`` command."""

import sys

from .main import main

sys.exit(main())
