"""``python -m onnxprune.cli``."""

import sys

from onnxprune.cli import main

sys.exit(main())
