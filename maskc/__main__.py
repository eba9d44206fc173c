"""``python -m maskc ...`` is the ``maskc`` command."""
import sys

from maskc.cli import main

sys.exit(main())
