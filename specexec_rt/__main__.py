"""``python -m specexec_rt ...`` is the ``specexec-rt`` command."""
import sys

from .serving.cli import main

sys.exit(main())
