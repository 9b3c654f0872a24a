"""`python jobs/deploy.py --model NAME --split stable=90,fast=10`: serve registry aliases with a weighted A/B split.

Writes a `serve deploy` config (variants pinned to the versions the aliases point to now), deploys it on the running
Ray cluster (one on this machine is started if there is none) and prints the OpenAI base URL.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a clean checkout needs no install

from strata.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["deploy", *sys.argv[1:]]))
