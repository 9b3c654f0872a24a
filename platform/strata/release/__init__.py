"""Release tracks: registry aliases (`fast`, `stable`) that move only through gates, with a history MLflow lacks.

    promotion  promote (gates, lock, compare-and-set), rollback, and their errors
    history    the release history as registered-model tags, written ahead of every move
    locks      the per-alias file locks under $STRATA_HOME/locks

Release sits above registry and serve; only the CLI and jobs import it.
"""

from strata.release.history import HistoryEvent, events, history_table
from strata.release.promotion import (
    BadTarget,
    Gate,
    Promotion,
    PromotionConflict,
    PromotionRefused,
    ReleaseError,
    gates_table,
    promote,
    release_history,
    rollback,
)

__all__ = [
    "BadTarget",
    "Gate",
    "HistoryEvent",
    "Promotion",
    "PromotionConflict",
    "PromotionRefused",
    "ReleaseError",
    "events",
    "gates_table",
    "history_table",
    "promote",
    "release_history",
    "rollback",
]
