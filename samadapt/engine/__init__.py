"""Training, prediction and evaluation engine."""
