"""Experiments: jobs that train, call measures and write tables, figures, summaries and reports."""
