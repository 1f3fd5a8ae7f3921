"""``python -m ptl_torchreid``: the same command line as ``ptl-torchreid``."""
import sys

from ptl_torchreid.cli import main

if __name__ == "__main__":
    sys.exit(main())
