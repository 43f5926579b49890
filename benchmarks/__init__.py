"""Runtime runners, statistics and the benchmark result schema."""
