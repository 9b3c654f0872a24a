"""`ray job submit ... -- python jobs/finetune.py --config configs/finetune-qlora-tiny.yaml [--set KEY=VALUE]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a clean checkout needs no install

from strata.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
