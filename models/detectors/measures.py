"""What each scenario kind's detector measures: the metric names a Scenario's thresholds may name.

A threshold on metric ``M`` applies to the measurements ``M`` and ``forecastM`` (see the city
operator's severity rule), so a kind whose detector forecasts ``forecastM`` accepts ``M`` too.
"""

from __future__ import annotations

from citynerve.models.detectors.crowd import CrowdCongestionDetector
from citynerve.models.detectors.flood import UrbanFloodWarning
from citynerve.models.detectors.mountain import MountainFloodWarning
from citynerve.models.detectors.water import WaterLeakDetector

DETECTOR_MEASURES: dict[str, tuple[str, ...]] = {
    "water-burst": WaterLeakDetector.MEASURES,
    "urban-flood": UrbanFloodWarning.MEASURES,
    "mountain-flood": MountainFloodWarning.MEASURES,
    "major-event": CrowdCongestionDetector.MEASURES,
}
_FORECAST = "forecast"


def threshold_metrics(kind: str) -> tuple[str, ...]:
    """The metric names a ``kind`` Scenario's thresholds may name, sorted."""
    measured = DETECTOR_MEASURES.get(kind, ())
    names = set(measured)
    for metric in measured:
        rest = metric[len(_FORECAST):]
        if metric.startswith(_FORECAST) and rest[:1].isupper():
            names.add(rest[:1].lower() + rest[1:])
    return tuple(sorted(names))
