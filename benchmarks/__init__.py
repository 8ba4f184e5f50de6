"""Benchmarks: programs that print figures and ratios (tests never time anything). Run them from
the repository root as modules, e.g. `python -m benchmarks.bench --shape S`; docs/PERFORMANCE.md
holds what they measured and the commands that made each figure."""
