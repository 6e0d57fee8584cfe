"""Evaluation: attacks (attacks.py), generation (generate.py), judges (judges.py), rates with bootstrap
intervals (metrics.py), utility and KL (utility.py), and the stage that ties them together (run.py)."""
