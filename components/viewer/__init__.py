"""Human-readable views of a run's artifacts."""
