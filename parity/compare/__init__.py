"""`parity compare`: two runs of PaliGemma, point by point (see core.py; statistics in stats.py, judgement in
tolerances.py, the verdict in verdict.py, sides in sides.py, terminal/JSON/HTML reports in report.py and html.py;
`--generate` in generation*.py)."""

from parity.compare.core import Comparison, PointRecord, compare, compare_captures, load, rejudge, save
from parity.compare.stats import PointStats, point_stats
from parity.compare.tolerances import PROFILES, Judgement, Tolerances

__all__ = [
    "Comparison",
    "PointRecord",
    "compare",
    "compare_captures",
    "load",
    "rejudge",
    "save",
    "PointStats",
    "point_stats",
    "PROFILES",
    "Judgement",
    "Tolerances",
]
