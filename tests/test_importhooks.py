"""study/importhooks.py: torchvision imports without TorchDynamo, and TorchDynamo still works afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


PROBE = """
import json, sys
import study.models, analysis.features, torchvision
ra = sys.modules["torchvision.ops.roi_align"]  # the package's attribute is the function
out = {"dynamo_at_import": "torch._dynamo" in sys.modules, "utils_at_import": "torch._dynamo.utils" in sys.modules}
import torch
boxes = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]])
x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
out["roi"] = torchvision.ops.roi_align(x, boxes, output_size=2, aligned=True).flatten().tolist()
out["compile_supported"] = ra.is_compile_supported("cpu")
import torch._dynamo.utils as real
out["real_after_call"] = type(sys.modules["torch._dynamo.utils"]).__name__ == "module" and hasattr(real, "counters")
out["same"] = real.is_compile_supported("cpu") == out["compile_supported"]
print(json.dumps(out))
"""


def test_torchvision_imports_without_dynamo_and_dynamo_loads_whole_on_first_use():
    got = _run(PROBE)
    assert got["dynamo_at_import"] is False and got["utils_at_import"] is False
    assert got["real_after_call"] and got["same"]
    # the same numbers as with the hook switched off (TorchDynamo imported by torchvision itself)
    eager = _run(PROBE, SSL_EAGER_DYNAMO="1")
    assert eager["dynamo_at_import"] is True
    assert got["roi"] == eager["roi"] and got["compile_supported"] == eager["compile_supported"]


def test_a_name_torchvision_did_not_expect_comes_from_the_real_module():
    got = _run("""
import json, sys, importlib
from study import importhooks
s = importhooks._StandIn("torch._dynamo.utils")
sys.modules["torch._dynamo.utils"] = s
fn = s.is_compile_supported  # not set on this stand-in: resolved through the real module
print(json.dumps({"real": fn.__module__, "registered": type(sys.modules["torch._dynamo.utils"]).__name__}))
""")
    assert got == {"real": "torch._dynamo.utils", "registered": "module"}


def test_nothing_is_hidden_when_dynamo_was_imported_first():
    got = _run("""
import json, sys, torch._dynamo
import study.models, torchvision
ra = sys.modules["torchvision.ops.roi_align"]
print(json.dumps({"fn": ra.is_compile_supported.__module__}))
""")
    assert got == {"fn": "torch._dynamo.utils"}
