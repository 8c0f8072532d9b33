"""``python -m hf_compress.cli``: the same as the ``hf-compress`` console script."""

import sys

from . import main


sys.exit(main())
