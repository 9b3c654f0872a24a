"""`python jobs/canary.py --config configs/canary.yaml`: a canary release of a deployed candidate variant.

Shifts traffic to the candidate step by step, rolls back at once on a breach (exit 1), and promotes it to `stable`
when every step has passed (exit 0). `python jobs/canary.py abort|pause|resume|status --model NAME` steers it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a clean checkout needs no install

from strata.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["canary", *sys.argv[1:]]))
