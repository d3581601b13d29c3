"""Entry point for ``python -m her2_monai``."""

from __future__ import annotations

import sys

from her2_monai.cli import main

sys.exit(main())
