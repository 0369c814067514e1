"""Exceptions that the CLI turns into a clear message and a non-zero exit code."""

from __future__ import annotations


class SamadaptError(Exception):
    """Base class of every error samadapt raises on purpose (bad input, bad config, bad checkpoint)."""


class InputError(SamadaptError):
    """A file or value given by the user is wrong; the message names it and says what was expected."""

    def __init__(self, where: object, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class ConfigError(SamadaptError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(SamadaptError):
    """A checkpoint is missing, for another backbone/method, or its keys do not match the model."""


class TrainingError(SamadaptError):
    """Training cannot go on (a non-finite loss); the message names the epoch and the cases of the batch."""
