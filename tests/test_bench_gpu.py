"""benchmarks/gpu.py runs unattended once on a rented GPU, so its CPU smoke run must hold the same code paths:
every stage reports a positive rate, a failing or over-budget stage becomes an error string (never a crash),
and the JSON is printed and written to $OUT/gpu.json whatever happened."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import study.data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
KEYS = {"device", "env", "config", "render_modes", "step_only_img_s", "loader_only_img_s", "batched_colour_img_s",
        "end_to_end_img_s", "goal", "pass", "errors", "skipped", "stage_s", "details", "complete", "wall_s"}


@pytest.fixture(scope="module")
def gpu() -> Iterator[types.ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the shard-writing pool pickles its worker function by module name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.slow
def test_smoke_runs_every_stage_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _last_json(proc.stdout)
    assert res == json.loads((tmp_path / "gpu.json").read_text())
    assert KEYS <= set(res)
    assert res["device"] == "cpu" and res["smoke"] is True
    assert res["errors"] == {} and res["skipped"] == {} and res["complete"] is True
    assert res["env"]["torch"] == torch.__version__ and res["env"]["cpus"] >= 1
    assert res["step_only_img_s"] > 0
    modes = res["render_modes"]
    assert "pil" in modes
    for mode in modes:
        assert res["loader_only_img_s"][mode] > 0
        assert res["end_to_end_img_s"][mode] > 0
        assert isinstance(res["pass"][mode], bool)
    if "batched" in modes:
        assert res["batched_colour_img_s"] > 0
    assert res["goal"] == 4000


@pytest.mark.parametrize(
    "stages, fail, errored, skipped",
    [("env,data,loader", "loader_pil", "loader_pil", set()),
     ("data,loader,e2e", "data", "data", {"loader_pil", "e2e_pil"})],
)
def test_a_failing_stage_is_recorded_and_json_still_printed(
    gpu: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    stages: str, fail: str, errored: str, skipped: set[str],
) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu, "render_modes", lambda: ["pil"])
    gpu.main(["--smoke", "--stages", stages, "--fail-stage", fail])
    res = _last_json(capsys.readouterr().out)
    assert res == json.loads((tmp_path / "gpu.json").read_text())
    assert set(res["errors"]) == {errored} and f"--fail-stage {fail}" in res["errors"][errored]
    assert set(res["skipped"]) == skipped and res["complete"] is False
    if fail != "data":
        assert res["details"]["data"]["images"] == 64  # the stages before it still ran


def test_budget_skips_stages_and_hard_stops_a_hung_one(
    gpu: types.ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("OUT", raising=False)
    res = gpu.main(["--smoke", "--budget-s", "0", "--stages", "env,step"])
    assert set(res["skipped"]) == {"env", "step"} and res["errors"] == {}
    assert _last_json(capsys.readouterr().out) == res

    class Hung:
        def __init__(self, *args: object) -> None:
            self.model = self.run = None

        def step(self, views: list[torch.Tensor]) -> None:
            time.sleep(30)

    monkeypatch.setattr(gpu, "Stepper", Hung)
    t0 = time.monotonic()
    res = gpu.main(["--smoke", "--budget-s", "4", "--stages", "step"])
    assert time.monotonic() - t0 < 15
    assert "StageTimeout" in res["errors"]["step"]
    assert res["step_only_img_s"] is None


@pytest.mark.slow
def test_batched_render_path_with_a_stub_renderer(
    gpu: types.ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The batched paths (render= to make_loader, BatchColour on the device) before study.colour exists."""
    seen: dict[str, list] = {"render": [], "dtypes": [], "steps": []}
    real = study.data.make_loader

    def make_loader(urls, crop_cfg, aug_cfg, batch_size, num_workers, seed, epoch_len, *,
                    shuffle_buffer=1000, render="pil"):
        seen["render"].append(render)
        if render == "pil":
            return real(urls, crop_cfg, aug_cfg, batch_size, num_workers, seed, epoch_len,
                        shuffle_buffer=shuffle_buffer)
        size = int(crop_cfg["size"])

        class Loader:
            def __iter__(self):
                while True:
                    yield {"views": [torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
                                     for _ in range(2)]}

        return Loader()

    class BatchColour:
        def __init__(self, aug_cfg: dict, sizes: list[int]) -> None:
            assert aug_cfg["pipeline"] == "v2" and len(sizes) == 2

        def __call__(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
            seen["dtypes"] += [v.dtype for v in views]
            return [(v.float() / 255 - 0.45) / 0.225 for v in views]

    def colour_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
        seen["steps"].append(step)
        return torch.Generator(device=device).manual_seed(seed * 100_003 + step)

    colour = types.ModuleType("study.colour")
    colour.BatchColour, colour.colour_generator = BatchColour, colour_generator
    monkeypatch.setitem(sys.modules, "study.colour", colour)
    monkeypatch.setattr(study.data, "make_loader", make_loader)
    monkeypatch.delenv("OUT", raising=False)
    res = gpu.main(["--smoke", "--size", "32", "--stages", "data,loader,colour,e2e"])
    assert res["render_modes"] == ["pil", "batched"]
    assert res["errors"] == {} and res["skipped"] == {}
    for mode in ("pil", "batched"):
        assert res["loader_only_img_s"][mode] > 0 and res["end_to_end_img_s"][mode] > 0
    assert res["batched_colour_img_s"] > 0
    assert set(seen["render"]) == {"pil", "batched"} and set(seen["dtypes"]) == {torch.uint8}
    assert seen["steps"][:3] == [0, 1, 2]  # a fresh, step-seeded generator per batch
    assert list(res["stage_s"])[:3] == ["data", "loader_batched", "colour"]  # the goal's candidate goes first
    assert _last_json(capsys.readouterr().out) == res
