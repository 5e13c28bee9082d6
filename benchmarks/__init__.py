"""orcinus benchmarks: side-by-side measurements; results go to BENCHMARKS.md."""
