"""Sweeps: what each job records about itself, and the report over all jobs of a sweep."""
