"""tools/: helper scripts, run from the repository root as `python -m tools.<name>`."""
