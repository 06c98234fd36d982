"""``torchrun -m fastdiff.train`` / ``python -m fastdiff.train``: see fastdiff.train.cli."""
import sys

from fastdiff.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
