"""The HTTP API (FastAPI; OpenAPI at ``/docs`` and ``/openapi.json``) and the page it serves at ``/``.

Slices travel as raw little-endian arrays (``application/octet-stream``) with their shape in ``X-Shape``:
images float32 C x H x W, masks uint8 (uint16 past 255 classes) H x W. Every ``/api`` call needs the token when
the app has one (``X-Token`` header or ``token`` query parameter). Errors are JSON ``{"detail": "..."}``: 400
for a bad file or request, 404 for an unknown session, 401 without the token, 413 past the upload limit.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..errors import SamadaptError
from .inputs import inside, list_folder, load_input, safe_name
from .model import ServedModel
from .session import Session, slice_view

STATIC = Path(__file__).parent / "static"


class OpenRequest(BaseModel):
    path: str = Field(description="A file of the served folder, relative to it (see GET /api/files).")


class PromptRequest(BaseModel):
    axis: int = 0
    index: int = 0
    cls: int = Field(1, description="The class the prompt is for (1..K).")
    x: float | None = Field(None, description="Click column (slice pixels); with y and positive.")
    y: float | None = None
    positive: bool = True
    box: list[float] | None = Field(None, description="x0, y0, x1, y1 in slice pixels.", min_length=4, max_length=4)


class PaintRequest(BaseModel):
    axis: int = 0
    index: int = 0
    cls: int = Field(1, description="Class to paint; 0 erases.")
    radius: float = 3.0
    points: list[list[float]] = Field(description="Stroke points [x, y] in slice pixels.", max_length=10_000)


class VolumeRequest(BaseModel):
    axis: int = 0


def _array(arr: np.ndarray, extra: dict | None = None) -> Response:
    headers = {"X-Shape": ",".join(str(s) for s in arr.shape), "X-Dtype": arr.dtype.name,
               "Cache-Control": "no-store", **(extra or {})}
    return Response(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes(),
                    media_type="application/octet-stream", headers=headers)


def create_app(model: ServedModel, folder: str | Path | None = None, token: str | None = None,
               max_upload_bytes: int = 1 << 30, workdir: str | Path | None = None, max_sessions: int = 8,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The app serving ``model``. ``folder``: files the page may open by name; ``token``: required on every API
    call when set; ``workdir``: where uploads live (a new temporary folder by default; each session gets its own
    subfolder, removed when the session is closed or evicted, the oldest past ``max_sessions``, and at shutdown);
    ``allowed_hosts``: the ``Host`` header names accepted (None: any), which keeps a loopback server from answering
    pages of other sites that rebind their name to 127.0.0.1."""
    own = workdir is None
    sessions: OrderedDict[str, Session] = OrderedDict()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="samadapt-serve-"))
    work.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for s in list(sessions.values()):
            s.close()
        sessions.clear()
        if own:
            shutil.rmtree(work, ignore_errors=True)

    app = FastAPI(title="samadapt serve", version="1", lifespan=lifespan,
                  description="Look at a model's predictions on an image and correct them with clicks.")
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    served = Path(folder).resolve() if folder else None
    sessions_lock = threading.Lock()
    app.state.sessions, app.state.workdir = sessions, work

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if token and request.url.path.startswith("/api"):
            given = request.headers.get("x-token") or request.query_params.get("token") or ""
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "missing or wrong token (see the URL printed by samadapt serve)"},
                                    status_code=401)
        return await call_next(request)

    @app.exception_handler(SamadaptError)
    async def bad_input(request: Request, exc: SamadaptError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def session(sid: str) -> Session:
        with sessions_lock:
            if sid not in sessions:
                raise HTTPException(404, f"no session {sid!r} (it may have been closed; open the file again)")
            return sessions[sid]

    def add_session(path: Path, name: str, sid: str) -> dict:
        try:
            case = load_input(path, name, max_unzipped=4 * max_upload_bytes)
        except SamadaptError:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise
        s = Session(sid, case, path.parent, model, name)
        with sessions_lock:
            sessions[sid] = s
            while len(sessions) > max_sessions:
                sessions.popitem(last=False)[1].close()
        return s.describe()

    @app.get("/api/info", summary="The served model and the server's limits")
    def info() -> dict:
        return {**model.info(), "max_upload_bytes": max_upload_bytes, "folder": served is not None}

    @app.get("/api/files", summary="Files of the served folder the page may open")
    def files() -> list[str]:
        return list_folder(served) if served else []

    @app.post("/api/sessions", summary="Upload a file (the raw bytes as the request body) and open it",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload(request: Request, name: str = Query(..., description="The file's name (its ending tells "
                                                                           "the format).")) -> dict:
        safe = safe_name(name)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes:
            raise HTTPException(413, f"{safe}: larger than the upload limit of {max_upload_bytes // 2**20} MiB")
        sid = uuid.uuid4().hex
        (work / sid).mkdir()
        path = work / sid / safe
        size = 0
        with open(path, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_upload_bytes:
                    out.close()
                    shutil.rmtree(work / sid, ignore_errors=True)
                    raise HTTPException(413, f"{safe}: larger than the upload limit of {max_upload_bytes // 2**20} "
                                             "MiB")
                out.write(chunk)
        return await run_in_threadpool(add_session, path, safe, sid)

    @app.post("/api/sessions/open", summary="Open a file of the served folder")
    def open_file(req: OpenRequest) -> dict:
        if served is None:
            raise HTTPException(400, "samadapt serve was started without --folder")
        source = inside(served, req.path)
        safe = safe_name(source.name)
        sid = uuid.uuid4().hex
        (work / sid).mkdir()
        shutil.copyfile(source, work / sid / safe)
        return add_session(work / sid / safe, req.path, sid)

    @app.get("/api/sessions/{sid}", summary="The opened image's shape, spacing, intensity range")
    def describe(sid: str) -> dict:
        return session(sid).describe()

    @app.delete("/api/sessions/{sid}", summary="Close a session and delete its files")
    def close(sid: str) -> dict:
        s = session(sid)
        with sessions_lock:
            sessions.pop(sid, None)
        s.close()
        return {"closed": sid}

    @app.get("/api/sessions/{sid}/image", summary="Raw intensities of one slice (float32 C x H x W)")
    def image(sid: str, axis: int = 0, index: int = 0) -> Response:
        return _array(session(sid).image_slice(axis, index))

    @app.get("/api/sessions/{sid}/mask", summary="The mask of one slice (automatic prediction on first view)")
    def mask(sid: str, axis: int = 0, index: int = 0, auto: bool = True) -> Response:
        return _array(session(sid).mask_slice(axis, index, auto))

    @app.get("/api/sessions/{sid}/prompts", summary="The prompts given on one slice for one class")
    def prompts(sid: str, axis: int = 0, index: int = 0, cls: int = 1) -> dict:
        return session(sid).slice_prompts(axis, index, cls)

    @app.post("/api/sessions/{sid}/prompt", summary="Add a click (x, y, positive) or a box; the new slice mask")
    def prompt(sid: str, req: PromptRequest) -> Response:
        if (req.x is None) != (req.y is None) or (req.x is None) == (req.box is None):
            raise HTTPException(400, "give either a click (x and y) or a box")
        point = (req.x, req.y, req.positive) if req.x is not None else None
        return _array(session(sid).prompt(req.axis, req.index, req.cls, point=point,
                                          box=tuple(req.box) if req.box else None))

    @app.post("/api/sessions/{sid}/paint", summary="Brush (cls >= 1) or eraser (cls = 0) stroke; the new slice mask")
    def paint(sid: str, req: PaintRequest) -> Response:
        if any(len(p) != 2 for p in req.points):
            raise HTTPException(400, "stroke points must be [x, y] pairs")
        return _array(session(sid).paint(req.axis, req.index, req.cls, [tuple(p) for p in req.points], req.radius))

    @app.post("/api/sessions/{sid}/undo", summary="Take back the last click, box or stroke")
    def undo(sid: str) -> dict:
        return {"undone": session(sid).undo()}

    @app.post("/api/sessions/{sid}/predict-volume", summary="Predict every slice along an axis (background job)")
    def predict_volume(sid: str, req: VolumeRequest) -> dict:
        s = session(sid)
        s.check_slice(req.axis, 0)
        start_job(s, s.predict_volume, req.axis)
        return dict(s.progress)

    def start_job(s: Session, job, *args) -> None:
        with s.lock:
            if s.progress["running"]:
                raise HTTPException(409, "a whole-volume job is already running on this image")
            s.progress.update(running=True, done=0, total=s.case.shape[args[0]], axis=args[0], error=None)
        threading.Thread(target=job, args=args, daemon=True).start()

    @app.post("/api/sessions/{sid}/propagate", summary="Carry one slice's class to the neighbouring slices "
                                                       "(promptable methods; background job)")
    def propagate(sid: str, req: PromptRequest) -> dict:
        s = session(sid)
        s.check_slice(req.axis, req.index)
        if not model.prompt_kinds:
            raise HTTPException(400, f"{model.method.name} takes no prompts: nothing to propagate with")
        if not (slice_view(s.mask, req.axis, req.index) == req.cls).any():
            raise HTTPException(400, f"class {req.cls} is empty on this slice: nothing to propagate")
        start_job(s, s.propagate, req.axis, req.index, req.cls)
        return dict(s.progress)

    @app.get("/api/sessions/{sid}/progress", summary="Progress of the whole-volume prediction")
    def progress(sid: str) -> dict:
        return dict(session(sid).progress)

    @app.get("/api/sessions/{sid}/download", summary="The mask with the input's geometry (NIfTI, or PNG for "
                                                     "pictures)")
    def download(sid: str) -> FileResponse:
        s = session(sid)
        path = s.write_mask()
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
