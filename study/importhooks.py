"""Import torchvision without TorchDynamo: about 1 s of CPU less in every job that uses torchvision.

``torchvision.ops.roi_align`` runs ``from torch._dynamo.utils import is_compile_supported`` at import time, and
``import torchvision`` imports ``torchvision.ops``. That one line loads the whole TorchDynamo compiler stack
(sympy, torch.fx.experimental, ...): measured with ``python -X importtime -c "import torchvision"`` on torch 2.14
/ torchvision 0.29 it is about 0.94 s of the 2.2 s import, while the function is called only when
``torch.compile`` traces ``roi_align``. Every pipeline job imports torchvision (transforms, decoding, models), so
the compiler stack was a third of each job's start-up.

While torchvision's own ``__init__`` runs, a stand-in module answers for ``torch._dynamo.utils``: it gives
``is_compile_supported`` as a function that imports the real one on its first call, and any other name through
the real module. The stand-in leaves ``sys.modules`` the moment torchvision is imported, so ``import
torch._dynamo`` and ``torch.compile`` later load the real package untouched. Nothing happens when TorchDynamo is
already imported (the stand-in would only hide it) or when ``SSL_EAGER_DYNAMO=1`` is set (to rule this hook out
while debugging). ``install()`` runs from the ``study``, ``analysis`` and ``data_prep`` package ``__init__``;
it imports nothing heavy itself, so the Snakefile's planning imports stay cheap.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import types
from typing import Any

_DYNAMO_UTILS = "torch._dynamo.utils"


def _real_utils() -> types.ModuleType:
    """The real ``torch._dynamo.utils`` (imported now if the stand-in is still registered)."""
    if isinstance(sys.modules.get(_DYNAMO_UTILS), _StandIn):
        del sys.modules[_DYNAMO_UTILS]
    return importlib.import_module(_DYNAMO_UTILS)


def is_compile_supported(device_type: str) -> bool:
    """``torch._dynamo.utils.is_compile_supported``, imported on the first call."""
    return _real_utils().is_compile_supported(device_type)


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str) -> Any:  # a name torchvision did not import in 0.29: the real one
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real_utils(), name)


class _TorchvisionLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        if "torch._dynamo" in sys.modules or _DYNAMO_UTILS in sys.modules:
            self._loader.exec_module(module)
            return
        stand_in = _StandIn(_DYNAMO_UTILS)
        stand_in.is_compile_supported = is_compile_supported
        sys.modules[_DYNAMO_UTILS] = stand_in
        try:
            self._loader.exec_module(module)
        finally:
            if sys.modules.get(_DYNAMO_UTILS) is stand_in:
                del sys.modules[_DYNAMO_UTILS]


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision":
            return None
        uninstall()  # one import of torchvision per process; find it with the remaining finders
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _TorchvisionLoader(spec.loader)
        return spec


def install() -> None:
    """Route the coming ``import torchvision`` through the stand-in (idempotent; a no-op once it is imported)."""
    if "torchvision" in sys.modules or os.environ.get("SSL_EAGER_DYNAMO") == "1":
        return
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionFinder)]
