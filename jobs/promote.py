"""`python jobs/promote.py MODEL VERSION --to stable --reason TEXT`: move a release track once its gates pass.

Submit it to the head (`ray job submit ... -- python jobs/promote.py ...`): the lock that keeps two promotions of
one alias apart is a file under the head's $STRATA_HOME. Exits 1 when refused, 2 on an unknown model or version.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a clean checkout needs no install

from strata.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
