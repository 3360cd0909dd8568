"""Benchmarks behind `arborl bench …`: ratios measured side by side in one run, reported as JSON."""
