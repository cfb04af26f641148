"""Dataset readers, subsets, shards, the synthetic world and FiftyOne."""

from study.importhooks import install as _install_import_hooks

_install_import_hooks()  # torchvision without TorchDynamo at import: study/importhooks.py
