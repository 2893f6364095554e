"""Entry points that nothing in the six method files imports: run each as `python -m tools.NAME`."""
