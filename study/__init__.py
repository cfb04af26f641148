"""Pretraining: the MoCo family, crops, augmentation and the trainer."""

from study.importhooks import install as _install_import_hooks

_install_import_hooks()  # torchvision without TorchDynamo at import: study/importhooks.py
