"""`python jobs/tune.py --config configs/tune-lora-tiny.yaml`: a Ray Tune sweep, every trial in MLflow.

The same as `strata tune`; runs under `ray job submit` as it is.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a clean checkout needs no install

from strata.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
