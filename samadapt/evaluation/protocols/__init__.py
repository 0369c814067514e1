"""Evaluation protocols beyond scoring a folder: domain generalisation, refinement curves, prompting, light decoder."""
