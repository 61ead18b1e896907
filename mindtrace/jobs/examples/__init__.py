"""Runnable examples: ``python -m mindtrace.jobs.examples.quickstart`` and ``...examples.async_quickstart``."""
