"""What the six method files import but a reader of the method can skip: the run folder and
checkpoint format (runs), RNG / DDP / AMP / signals (runtime), the datasets (catalog, download,
demo), the backbone weights (weights) and the user-error contract (errors)."""
