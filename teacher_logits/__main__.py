"""``python -m teacher_logits ...``: the ``teacher-logits`` command."""

import sys

from .cli import main

sys.exit(main())
