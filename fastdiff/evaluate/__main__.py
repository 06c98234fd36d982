"""``python -m fastdiff.evaluate``: see fastdiff/evaluate/cli.py."""
import sys

from .cli import main

sys.exit(main())
