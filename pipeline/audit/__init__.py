"""The audit stage: checks of a reference cache (checks.py), its report (report.py) and the
token-by-token view (tokens.py)."""
