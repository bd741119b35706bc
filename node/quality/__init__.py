"""Plausibility checks handlers run on their own results before returning them (as
``node.results.QualityFlag``). ``slices``: generic checks of one structure's mask."""
