"""One benchmark's figures: raw runs, their medians, the baseline, the ratio and the aim."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.harness import median


@dataclass
class Result:
    """A measured figure set against its baseline from the same run."""

    name: str
    metric: str  # what `value` is, e.g. "jobs/s"
    runs: list[float]
    baseline_metric: str = ""
    baseline_runs: list[float] = field(default_factory=list)
    ratio_meaning: str = "value / baseline"
    aim: str = ""
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # wall time the benchmark took
    # Each run has a baseline run of its own, just before it: the ratio is then the median
    # of the runs' own ratios, which cancels noise slower than a pair of runs.
    paired: bool = False

    @property
    def value(self) -> float:
        return median(self.runs)

    @property
    def baseline(self) -> float | None:
        return median(self.baseline_runs) if self.baseline_runs else None

    @property
    def ratio(self) -> float | None:
        base = self.baseline
        if base is None or base == 0 or math.isnan(base):
            return None
        return median(self.run_ratios) if self.paired else self.value / base

    @property
    def run_ratios(self) -> list[float]:
        """Each repetition's own ratio (repetitions alternate target and baseline)."""
        return [a / b for a, b in zip(self.runs, self.baseline_runs, strict=False) if b]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            value=self.value, baseline=self.baseline, ratio=self.ratio, run_ratios=self.run_ratios
        )
        return data
