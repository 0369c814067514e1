"""``samadapt serve``: a web page (and its HTTP API) to look at a model's predictions and correct them.

``load_model`` builds the served model from a run or a preset, ``create_app`` the FastAPI app, ``run_server``
starts it with uvicorn. The page (``static/``) is plain JavaScript with no outside resources: it works offline.
"""

from .app import create_app, is_loopback
from .launch import load_model, run_server
from .model import ServedModel

__all__ = ["ServedModel", "create_app", "is_loopback", "load_model", "run_server"]
