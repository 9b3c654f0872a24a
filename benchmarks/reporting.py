"""How every benchmark ends: a target checked in one shape, the verdict printed the same way, the JSON file written."""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RELATIONS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


def check(value: float, relation: str, bound: float, unit: str = "", **extra: Any) -> dict[str, Any]:
    """A measured value against its target, as every results file records it (`extra` says what was measured)."""
    return {
        **extra,
        "value": value,
        "target": f"{relation} {bound}{unit}",
        "target_met": bool(RELATIONS[relation](value, bound)),
    }


def verdict(met: bool) -> str:
    return "[green]target met[/green]" if met else "[red]target missed[/red]"


def write_results(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
