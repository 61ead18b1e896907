"""Alias package for the seed specification's import path ``mindtrace.jobs.mindtrace.types``; nothing else."""
