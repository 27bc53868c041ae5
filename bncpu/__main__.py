"""``python -m bncpu``: the speed report (bncpu/bench/)."""
import sys

from bncpu.bench import main

if __name__ == "__main__":
    sys.exit(main())
