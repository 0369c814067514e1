"""Start-up of ``samadapt serve``: the model from a run folder or a preset, the token rule, uvicorn."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Callable

from ..engine.checkpoint import read_manifest
from ..config.run_config import RunConfig
from ..engine.predict import Predictor
from ..engine.rundir import resolve_checkpoint
from ..errors import ConfigError, InputError
from .model import ServedModel


def load_model(run: str | Path | None = None, config: RunConfig | None = None, num_classes: int = 1,
               device: str = "auto", fast: bool = False) -> ServedModel:
    """The served model: a ``samadapt train`` run folder (its best checkpoint and class names) or a run config
    (zero-shot methods such as box-prompt; ``num_classes`` foreground classes). ``fast``: whole volumes are
    predicted on the fastest path within tolerance (``ServedModel.volume_predictor``)."""
    from ..engine.path_choice import model_key

    if (run is None) == (config is None):
        raise ConfigError("give exactly one of --run or --config")
    if run is not None:
        checkpoint = resolve_checkpoint(run)
        predictor = Predictor.from_checkpoint(checkpoint, device=device, batch_size=8)
        labels = ((read_manifest(checkpoint).get("data") or {}).get("source") or {}).get("labels") or {}
        names = [n for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v > 0]
        return ServedModel(predictor, names, checkpoint, fast_key=model_key(checkpoint) if fast else None)
    predictor = Predictor.from_config(config, num_classes, device=device, batch_size=8)
    return ServedModel(predictor, fast_key=model_key(config=config, num_classes=num_classes) if fast else None)


def run_server(model: ServedModel, host: str = "127.0.0.1", port: int = 8000, folder: str | None = None,
               max_upload_mb: int = 1024, say: Callable[[str], None] = print) -> None:
    """Serve ``model`` until interrupted. A host other than loopback gets a fresh token, printed in the URL."""
    import uvicorn

    from .app import create_app, is_loopback

    if folder is not None and not Path(folder).is_dir():
        raise InputError(folder, "--folder must be an existing folder")
    token = None if is_loopback(host) else secrets.token_urlsafe(24)
    shown = f"[{host}]" if ":" in host else host
    hosts = None if token else ["127.0.0.1", "localhost", shown]  # Host header names a loopback server answers
    app = create_app(model, folder=folder, token=token, max_upload_bytes=max_upload_mb << 20, allowed_hosts=hosts)
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    info = model.info()
    say(f"samadapt serve: {info['method']} on {info['backbone']} ({info['device']}); open {url}")
    if token:
        say("the server listens beyond this machine: every request needs the token in that URL")
    uvicorn.run(app, host=host, port=port, log_level="warning")
