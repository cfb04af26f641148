"""Missing torchvision targets: the error names the folder layout torchvision reads (checked against the paths
in torchvision's own source) and the split in words, never torchvision's `download=True` advice, which this
project disables."""

from __future__ import annotations

import pytest

from analysis.targets import TargetNotFoundError, read_torchvision

# format -> (split role, folders/files the message must name, split words it must contain)
CASES = [
    ("cifar10", "train", ["cifar-10-batches-py/", "data_batch_1"], "training split"),
    ("cifar10", "test", ["cifar-10-batches-py/", "test_batch"], "test split"),
    ("food101", "train", ["food-101/images", "food-101/meta"], "split 'train'"),
    ("pets", "train", ["oxford-iiit-pet/images", "oxford-iiit-pet/annotations"], "split 'trainval'"),
    (
        "cars",
        "test",
        ["stanford_cars/devkit", "stanford_cars/cars_test/", "cars_test_annos_withlabels.mat"],
        "'test'",
    ),
    ("places365", "test", ["categories_places365.txt", "places365_val.txt", "val_256/"], "split 'val'"),
    ("sun397", "test", ["SUN397/ClassName.txt", "SUN397/<letter>/<class>"], "test split"),
]


@pytest.mark.parametrize("fmt, role, paths, words", CASES)
def test_missing_split_names_layout_and_split(tmp_path, fmt, role, paths, words):
    with pytest.raises(TargetNotFoundError) as e:
        read_torchvision("t", fmt, tmp_path, role)
    msg = str(e.value)
    assert all(p in msg for p in paths), msg
    assert words in msg and str(tmp_path) in msg
    assert "download=True" not in msg and "split True" not in msg and "split None" not in msg


def test_partial_food101_layout_still_names_what_is_expected(tmp_path):
    (tmp_path / "food-101" / "meta").mkdir(parents=True)  # meta/ but no images/
    with pytest.raises(TargetNotFoundError, match=r"Food101 split 'test' not found .*food-101/images"):
        read_torchvision("food", "food101", tmp_path, "test")


def test_places365_without_its_image_folder_is_reported_before_loading(tmp_path):
    """torchvision reads only the file lists at construction; the 256px image folder is checked here."""
    (tmp_path / "categories_places365.txt").write_text("/a/airfield 0\n/b/bakery 1\n")
    (tmp_path / "places365_val.txt").write_text("Places365_val_00000001.jpg 0\n")
    import torchvision.datasets.places365 as p365

    # The md5 check of the real lists cannot pass for hand-made ones; the layout check is what is tested.
    mp = pytest.MonkeyPatch()
    mp.setattr(p365.Places365, "_check_integrity", lambda self, file, md5, download: True)
    try:
        with pytest.raises(TargetNotFoundError, match=r"image folder .*val_256 does not exist.*val_256/"):
            read_torchvision("places", "places365", tmp_path, "test")
    finally:
        mp.undo()
