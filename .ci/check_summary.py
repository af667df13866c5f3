"""Fails unless a run's summary.json has a final test metric inside a band.

    python3 .ci/check_summary.py RUN/summary.json METRIC LOW HIGH

Prints the metric either way, so the CI log shows the figure each backend reached.
"""
import json
import math
import sys


def main(path, metric, low, high):
    with open(path) as f:
        summary = json.load(f)
    metrics = dict(summary["final_test"]["metrics"])
    value = metrics.get(metric)
    if value is None or not math.isfinite(value):
        sys.exit(f"{path}: final test {metric} is {value!r}; metrics: {metrics}")
    print(f"{path}: final test {metric} = {value:.4f} (band {low}..{high})")
    if not float(low) <= value <= float(high):
        sys.exit(f"{path}: final test {metric} {value:.4f} is outside {low}..{high}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
