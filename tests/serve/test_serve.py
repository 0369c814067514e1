"""`samadapt serve`'s HTTP API on the tiny backbone: open, slices, automatic mask, clicks/box (embedding reused),
brush, undo, whole volume, download with the input's geometry; bad files, path traversal, token, upload limit."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient
from PIL import Image

from samadapt.config.run_config import load_config
from samadapt.engine.predict import Predictor
from samadapt.engine.run import build_model, intensity_config
from samadapt.serve import ServedModel, create_app, is_loopback, load_model
from samadapt.serve.inputs import safe_name
from support import write_dicom_series
from support import write_phantom

pytestmark = pytest.mark.usefixtures("one_torch_thread")





@pytest.fixture(scope="module")
def box_model():
    return load_model(config=load_config("box_prompt_whole", ["backbone.name=tiny"]), device="cpu")


@pytest.fixture()
def client(box_model, tmp_path):
    app = create_app(box_model, workdir=tmp_path / "work")
    with TestClient(app) as c:
        c.workdir = tmp_path / "work"
        yield c


def upload(client, path: Path, name: str | None = None):
    return client.post(f"/api/sessions?name={name or path.name}", content=path.read_bytes())


def mask_of(resp) -> np.ndarray:
    shape = tuple(int(s) for s in resp.headers["x-shape"].split(","))
    return np.frombuffer(resp.content, dtype=resp.headers["x-dtype"]).reshape(shape)


def test_info_names_the_model_and_its_prompts(client):
    info = client.get("/api/info").json()
    assert info["method"] == "box-prompt" and info["backbone"] == "tiny" and info["device"] == "cpu"
    assert info["prompt_kinds"] == ["points", "boxes"]
    assert [c["id"] for c in info["classes"]] == [1]
    assert "/api/sessions/{sid}/prompt" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text and "http" not in page.text.split("<body>")[1]


def test_open_slices_clicks_undo_and_download_keep_geometry(client, box_model, tmp_path):
    src = write_phantom(tmp_path / "ct scan.nii.gz")
    desc = upload(client, src, "ct scan.nii.gz").json()
    assert desc["shape"] == [12, 40, 48] and desc["name"] == "ct_scan.nii.gz"
    assert desc["spacing"] == pytest.approx([2.5, 0.9, 0.8])
    sid = desc["id"]
    image = client.get(f"/api/sessions/{sid}/image?axis=0&index=6")
    pixels = np.frombuffer(image.content, np.float32).reshape(1, 40, 48)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(src)))[6].astype(np.float32)
    np.testing.assert_array_equal(pixels[0], expected)
    assert mask_of(client.get(f"/api/sessions/{sid}/image?axis=2&index=3")).shape == (1, 12, 40)

    runs = box_model.encoder_runs
    auto = mask_of(client.get(f"/api/sessions/{sid}/mask?axis=0&index=6"))
    assert auto.shape == (40, 48) and set(np.unique(auto)) <= {0, 1}
    first = mask_of(client.post(f"/api/sessions/{sid}/prompt", json={"axis": 0, "index": 6, "x": 24, "y": 20}))
    second = mask_of(client.post(f"/api/sessions/{sid}/prompt",
                                 json={"axis": 0, "index": 6, "x": 5, "y": 5, "positive": False}))
    boxed = mask_of(client.post(f"/api/sessions/{sid}/prompt", json={"axis": 0, "index": 6, "box": [30, 30, 10, 8]}))
    assert box_model.encoder_runs == runs + 1  # one encoder pass for the slice, then only the decoder
    assert (first != auto).any() and (second != first).any() and (boxed != second).any()
    prompts = client.get(f"/api/sessions/{sid}/prompts?axis=0&index=6&cls=1").json()
    assert prompts == {"points": [{"x": 24.0, "y": 20.0, "positive": True}, {"x": 5.0, "y": 5.0, "positive": False}],
                       "box": [10.0, 8.0, 30.0, 30.0]}

    assert client.post(f"/api/sessions/{sid}/undo").json() == {"undone": {"axis": 0, "index": 6}}
    np.testing.assert_array_equal(mask_of(client.get(f"/api/sessions/{sid}/mask?axis=0&index=6")), second)
    assert client.get(f"/api/sessions/{sid}/prompts?axis=0&index=6&cls=1").json()["box"] is None

    painted = mask_of(client.post(f"/api/sessions/{sid}/paint",
                                  json={"axis": 0, "index": 6, "cls": 1, "radius": 2, "points": [[40, 35]]}))
    assert painted[35, 38:43].tolist() == [1] * 5 and painted[33:38, 40].tolist() == [1] * 5
    erased = mask_of(client.post(f"/api/sessions/{sid}/paint",
                                 json={"axis": 0, "index": 6, "cls": 0, "radius": 3, "points": [[40, 35]]}))
    assert erased[32:39, 40].sum() == 0

    got = client.get(f"/api/sessions/{sid}/download")
    assert got.status_code == 200 and 'filename="ct_scan_mask.nii.gz"' in got.headers["content-disposition"]
    (tmp_path / "mask.nii.gz").write_bytes(got.content)
    out, ref = sitk.ReadImage(str(tmp_path / "mask.nii.gz")), sitk.ReadImage(str(src))
    assert out.GetSize() == ref.GetSize() and out.GetSpacing() == ref.GetSpacing()
    assert out.GetOrigin() == ref.GetOrigin() and out.GetDirection() == ref.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out)[6], erased)
    assert client.delete(f"/api/sessions/{sid}").status_code == 200
    assert client.get(f"/api/sessions/{sid}").status_code == 404 and list(client.workdir.iterdir()) == []


def test_views_along_another_axis_keep_corrections(client, tmp_path):
    sid = upload(client, write_phantom(tmp_path / "v.nii.gz")).json()["id"]
    edited = mask_of(client.post(f"/api/sessions/{sid}/paint", json={"axis": 0, "index": 6, "cls": 0, "radius": 100,
                                                                     "points": [[0, 0]]}))
    assert edited.sum() == 0
    column = mask_of(client.get(f"/api/sessions/{sid}/mask?axis=2&index=24"))  # Z x Y, crosses slice 6
    assert column.shape == (12, 40) and column[6].sum() == 0


def test_predict_volume_fills_every_slice(client, tmp_path):
    sid = upload(client, write_phantom(tmp_path / "v.nii.gz")).json()["id"]
    assert client.post(f"/api/sessions/{sid}/predict-volume", json={"axis": 0}).status_code == 200
    session = client.app.state.sessions[sid]
    import time

    while client.get(f"/api/sessions/{sid}/progress").json()["running"]:
        time.sleep(0.05)
    progress = client.get(f"/api/sessions/{sid}/progress").json()
    assert progress["done"] == progress["total"] == 12 and progress["error"] is None
    assert session.done.all()
    one = mask_of(client.get(f"/api/sessions/{sid}/mask?axis=0&index=3"))
    probs = session.model.predict_slice(session._dataset(0)[3])
    np.testing.assert_array_equal(one, probs.argmax(0).numpy())


def test_propagate_carries_a_slice_to_its_neighbours_and_undoes_at_once(client, tmp_path):
    from samadapt.serve.model import Prompts
    from samadapt.serve.session import prompts_from_mask

    sid = upload(client, write_phantom(tmp_path / "v.nii.gz")).json()["id"]
    session = client.app.state.sessions[sid]
    assert client.post(f"/api/sessions/{sid}/propagate", json={"axis": 0, "index": 6, "cls": 1}).status_code == 400
    client.post(f"/api/sessions/{sid}/paint", json={"axis": 0, "index": 6, "cls": 0, "radius": 100, "points": [[0, 0]]})
    start = mask_of(client.post(f"/api/sessions/{sid}/paint", json={"axis": 0, "index": 6, "cls": 1, "radius": 6,
                                                                    "points": [[24, 20]]}))
    before_mask, before_done = session.mask.copy(), session.done.copy()
    assert client.post(f"/api/sessions/{sid}/propagate", json={"axis": 0, "index": 6, "cls": 1}).status_code == 200
    import time

    while client.get(f"/api/sessions/{sid}/progress").json()["running"]:
        time.sleep(0.05)
    assert client.get(f"/api/sessions/{sid}/progress").json()["error"] is None
    assert prompts_from_mask(start == 1, ("points", "boxes")).box == (16, 12, 32, 28)
    assert prompts_from_mask(start == 1, ("points",)).points == [(24.0, 20.0, True)]
    expected = session.model.predict_slice(session._dataset(0)[7], Prompts(box=(16, 12, 32, 28)), 1)[1].numpy() > .5
    np.testing.assert_array_equal(session.mask[7] == 1, expected)
    np.testing.assert_array_equal(session.mask[6], start)
    assert session.done[7].all() and session.done[5].all()
    assert client.post(f"/api/sessions/{sid}/undo").json() == {"undone": {"axis": 0, "index": 6}}
    np.testing.assert_array_equal(session.mask, before_mask)
    np.testing.assert_array_equal(session.done, before_done)


def test_picture_round_trip_as_png(client, tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    desc = upload(client, tmp_path / "p.png").json()
    assert desc["is_2d"] and desc["channels"] == 3 and desc["download"] == "p_mask.png"
    sid = desc["id"]
    assert client.get(f"/api/sessions/{sid}/mask?axis=1&index=0").status_code == 400
    shown = mask_of(client.get(f"/api/sessions/{sid}/mask?axis=0&index=0"))
    saved = np.array(Image.open(io.BytesIO(client.get(f"/api/sessions/{sid}/download").content)))
    assert saved.shape == (30, 50)
    np.testing.assert_array_equal(saved, shown)


def test_zipped_dicom_series_opens_and_member_paths_are_ignored(client, tmp_path):
    vol = (np.arange(4 * 20 * 24).reshape(4, 20, 24) % 300).astype(np.int16)
    write_dicom_series(tmp_path / "dcm", vol, "1.2.826.0.1.3680043.2.1.300")
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as zf:
        for i, f in enumerate(sorted((tmp_path / "dcm").iterdir())):
            zf.write(f, f"../../escape{i}.dcm" if i == 0 else f"a/{f.name}")
    desc = upload(client, tmp_path / "series.zip").json()
    assert desc["shape"] == [4, 20, 24] and desc["modality"] == "CT"
    assert not list(tmp_path.glob("escape*")) and not list(client.workdir.parent.glob("escape*"))
    assert all(p.resolve().is_relative_to(client.workdir.resolve()) for p in client.workdir.rglob("*"))


def test_bad_files_get_a_clear_message_and_leave_nothing(client, tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    r = upload(client, tmp_path / "broken.nii.gz")
    assert r.status_code == 400 and r.json()["detail"].startswith("broken.nii.gz: ")
    assert str(client.workdir) not in r.json()["detail"]
    (tmp_path / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    assert upload(client, tmp_path / "trunc.png").json()["detail"].startswith("trunc.png: ")
    (tmp_path / "notes.txt").write_text("hello")
    r = upload(client, tmp_path / "notes.txt")
    assert r.status_code == 400 and "unsupported file type" in r.json()["detail"]
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    assert "zip" in upload(client, tmp_path / "bad.zip").json()["detail"]
    assert list(client.workdir.iterdir()) == [] and client.app.state.sessions == {}
    assert client.get("/api/sessions/nope/mask").status_code == 404
    sid = upload(client, write_phantom(tmp_path / "ok.nii.gz")).json()["id"]  # the server still works
    assert client.get(f"/api/sessions/{sid}/mask?axis=0&index=99").json()["detail"].endswith("along axis 0")
    assert client.post(f"/api/sessions/{sid}/prompt", json={"axis": 0, "index": 1, "x": 100, "y": 1}).status_code == 400
    assert client.post(f"/api/sessions/{sid}/prompt", json={"axis": 0, "index": 1}).status_code == 400


def test_names_never_become_paths_outside_the_work_folder(client, tmp_path):
    for name in ("../../../tmp/evil.nii.gz", "..\\..\\evil.nii.gz", "/etc/evil.nii.gz", "%2e%2e%2fevil.nii.gz"):
        assert safe_name(name).endswith("evil.nii.gz") and "/" not in safe_name(name) and "\\" not in safe_name(name)
    desc = upload(client, write_phantom(tmp_path / "v.nii.gz"), "../../../escaped.nii.gz").json()
    assert desc["name"] == "escaped.nii.gz"
    assert [p.name for p in client.workdir.rglob("*.nii.gz")] == ["escaped.nii.gz"]
    assert not (tmp_path / "escaped.nii.gz").exists() and not (client.workdir.parent / "escaped.nii.gz").exists()
    with pytest.raises(Exception):
        safe_name("..")


def test_served_folder_refuses_traversal_and_links(box_model, tmp_path):
    served = tmp_path / "served"
    (served / "sub").mkdir(parents=True)
    write_phantom(served / "sub" / "a.nii.gz")
    secret = write_phantom(tmp_path / "secret.nii.gz")
    (served / "link.nii.gz").symlink_to(secret)
    with TestClient(create_app(box_model, folder=served, workdir=tmp_path / "w")) as c:
        assert c.get("/api/files").json() == ["sub/a.nii.gz"]  # the link leaves the folder
        assert c.post("/api/sessions/open", json={"path": "sub/a.nii.gz"}).json()["shape"] == [12, 40, 48]
        for bad in ("../secret.nii.gz", str(secret), "sub/../../secret.nii.gz", "link.nii.gz", "sub", "nope.nii.gz"):
            r = c.post("/api/sessions/open", json={"path": bad})
            assert r.status_code == 400 and "served folder" in r.json()["detail"], bad


def test_token_is_required_when_set(box_model, tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with TestClient(create_app(box_model, token="s3cret", workdir=tmp_path / "w")) as c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/info", headers={"X-Token": "wrong"}).status_code == 401
        assert c.get("/api/info", headers={"X-Token": "s3cret"}).status_code == 200
        assert c.get("/api/info?token=s3cret").status_code == 200
        assert c.post("/api/sessions?name=a.nii.gz", content=b"x").status_code == 401
        assert list((tmp_path / "w").iterdir()) == []
        assert c.get("/").status_code == 200  # the page itself holds no data


def test_run_server_prints_a_token_beyond_loopback(box_model, monkeypatch):
    import uvicorn

    from samadapt.serve import run_server

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.update(app=app, host=host, port=port))
    said: list[str] = []
    run_server(box_model, host="0.0.0.0", port=8123, say=said.append)
    token = said[0].split("?token=")[1]
    assert said[0].endswith(f"open http://0.0.0.0:8123/?token={token}") and len(token) >= 24
    with TestClient(started["app"]) as c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/info", headers={"X-Token": token}).status_code == 200
        c.post("/api/sessions?name=v.nii.gz", content=b"x", headers={"X-Token": token})
    assert not started["app"].state.workdir.exists()  # its own temporary folder goes at shutdown
    said.clear()
    run_server(box_model, host="127.0.0.1", port=8124, say=said.append)
    assert said[0].endswith("open http://127.0.0.1:8124/") and started["host"] == "127.0.0.1"
    with TestClient(started["app"], base_url="http://127.0.0.1:8124") as c:
        assert c.get("/api/info").status_code == 200
        assert c.get("/api/info", headers={"host": "rebound.example"}).status_code == 400


def test_loopback_server_answers_only_loopback_host_names(box_model, tmp_path):
    app = create_app(box_model, workdir=tmp_path / "w", allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/info").status_code == 200
        assert c.get("/api/info", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/api/info", headers={"host": "attacker.example:8000"}).status_code == 400


def test_upload_limit(box_model, tmp_path):
    src = write_phantom(tmp_path / "v.nii.gz")
    limit = src.stat().st_size - 1
    with TestClient(create_app(box_model, max_upload_bytes=limit, workdir=tmp_path / "w")) as c:
        r = upload(c, src)
        assert r.status_code == 413 and "upload limit" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while streaming
            data = src.read_bytes()
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]

        r = c.post("/api/sessions?name=v.nii.gz", content=chunks())
        assert r.status_code == 413 and list((tmp_path / "w").iterdir()) == []
        assert c.app.state.sessions == {}


def test_prompt_free_method_refuses_clicks_but_paints(tmp_path):
    cfg = load_config("decoder_tiny", [])
    _, method = build_model(cfg, 1, __import__("torch").device("cpu"))
    model = ServedModel(Predictor(method, intensity_config(cfg.data)))
    assert model.info()["prompt_kinds"] == []
    with TestClient(create_app(model, workdir=tmp_path / "w")) as c:
        sid = upload(c, write_phantom(tmp_path / "v.nii.gz")).json()["id"]
        r = c.post(f"/api/sessions/{sid}/prompt", json={"axis": 0, "index": 2, "x": 3, "y": 3})
        assert r.status_code == 400 and "takes no prompts" in r.json()["detail"]
        r = c.post(f"/api/sessions/{sid}/propagate", json={"axis": 0, "index": 2, "cls": 1})
        assert r.status_code == 400 and "takes no prompts" in r.json()["detail"]
        r = c.post(f"/api/sessions/{sid}/paint", json={"axis": 0, "index": 2, "cls": 1, "radius": 1, "points": [[3, 3]]})
        assert mask_of(r)[3, 3] == 1


def test_serves_a_trained_run_with_its_class_names_and_checkpoint_hash(tmp_path):
    import json

    from samadapt.engine.checkpoint import checkpoint_digest
    from samadapt.engine.run import train
    from synthetic import write_disc_pictures

    (tmp_path / "discs").mkdir()
    data = write_disc_pictures(tmp_path / "discs", 8, (48, 56), 0, "case{:02d}", (15, 35, 15, 40), (6, 12))
    cfg = load_config("decoder_tiny", [f"data.path={data}", f"output={tmp_path / 'run'}", "train.epochs=1",
                                       "train.device=cpu", "data.cache=off", "train.batch_size=4"])
    train(cfg)
    model = load_model(run=tmp_path / "run", device="cpu")
    info = model.info()
    best = tmp_path / "run" / "checkpoints" / "best.safetensors"
    assert info["method"] == "decoder" and info["checkpoint"] == "best.safetensors"
    assert info["checkpoint_sha256"] == checkpoint_digest(best) and info["prompt_kinds"] == []
    labels = json.loads(best.with_suffix(".json").read_text())["data"]["source"]["labels"]
    assert [c["name"] for c in info["classes"]] == [n for n, v in labels.items() if v == 1]
    with TestClient(create_app(model, workdir=tmp_path / "w")) as c:
        desc = upload(c, data / "images" / "case00.png").json()
        shown = mask_of(c.get(f"/api/sessions/{desc['id']}/mask?axis=0&index=0"))
        assert shown.shape == (48, 56)
        case = model.predictor.predict_case(c.app.state.sessions[desc["id"]].case)
        np.testing.assert_array_equal(shown, case[0])  # the page shows what `samadapt predict` writes


def test_serve_command_needs_one_model_source():
    from typer.testing import CliRunner

    from samadapt.cli import app

    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2 and "exactly one of --run or --config" in result.output
    result = CliRunner().invoke(app, ["serve", "--run", "/nonexistent/run"])
    assert result.exit_code == 2 and "no checkpoints/best.safetensors" in result.output


def test_fast_volume_prediction_chooses_a_path_once_and_matches_the_exact_masks(tmp_path, monkeypatch):
    """serve --fast: the first whole-volume prediction times the paths and keeps the fastest within tolerance
    (reported in /api/info); the masks agree with the exact model's; a second volume reuses the choice."""
    monkeypatch.setenv("SAMADAPT_HOME", str(tmp_path / "home"))
    model = load_model(config=load_config("box_prompt_whole", ["backbone.name=tiny"]), device="cpu", fast=True)
    app = create_app(model, workdir=tmp_path / "work")
    import time

    with TestClient(app) as c:
        assert c.get("/api/info").json()["volume_path"].startswith("fastest within tolerance")
        for name in ("a.nii.gz", "b.nii.gz"):
            sid = upload(c, write_phantom(tmp_path / name)).json()["id"]
            assert c.post(f"/api/sessions/{sid}/predict-volume", json={"axis": 0}).status_code == 200
            while c.get(f"/api/sessions/{sid}/progress").json()["running"]:
                time.sleep(0.05)
            assert c.get(f"/api/sessions/{sid}/progress").json()["error"] is None
            if name == "a.nii.gz":
                choice = model.path_choice
        assert model.path_choice is choice  # chosen once
        chosen = c.get("/api/info").json()["volume_path"]
        assert chosen == choice["chosen"] and any(r["within_tolerance"] for r in choice["candidates"])
        session = c.app.state.sessions[sid]
        agree = [mask_of(c.get(f"/api/sessions/{sid}/mask?axis=0&index={i}"))
                 == session.model.predict_slice(session._dataset(0)[i]).argmax(0).numpy() for i in range(12)]
        assert np.mean(agree) >= 0.99  # the lossy paths' tolerance is class agreement, not identity
