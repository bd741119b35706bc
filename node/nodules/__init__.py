"""Lung nodules: candidates, 3-D measurement, size categories and follow-up (the ``lung-nodules`` handler)."""
