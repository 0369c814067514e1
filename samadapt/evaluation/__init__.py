"""Evaluation: metrics, folder scoring, model comparison, reports and plots, and the named evaluation protocols
(``protocols/``). Imports the engine below it, never the other way round."""
