"""The synthetic scenes: API contract, determinism, balance, normalisation and the modality-information
property that makes them a meaningful missing-modality benchmark (rgb dominant, nir/dsm fragile)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgma.data.synthetic import (
    BUILDING,
    CLASSES,
    DEFAULT_MODALITIES,
    IMPERVIOUS,
    LOW_VEGETATION,
    MODALITIES,
    PALETTE,
    TREE,
    SyntheticScenes,
    iou_per_class,
    measure_stats,
    modality_probe,
    pair_confusion,
    render_scene,
)
from sgma.modalities import Modality


def test_constants() -> None:
    assert len(CLASSES) == len(PALETTE) == 6
    assert CLASSES[0] == "impervious_surface" and CLASSES[4] == "car"
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)
    assert list(MODALITIES) == ["rgb", "nir", "dsm", "sar"]
    assert [m.channels for m in MODALITIES.values()] == [3, 1, 1, 1]
    assert all(isinstance(m, Modality) and m.name == k for k, m in MODALITIES.items())
    assert DEFAULT_MODALITIES == ("rgb", "nir", "dsm")


def test_render_scene_shapes_and_dtypes() -> None:
    scene = render_scene(0, 0, 96, ("sar", "rgb", "dsm", "nir"))
    assert list(scene) == ["rgb", "nir", "dsm", "sar", "mask"]  # canonical order
    for name, mod in MODALITIES.items():
        x = scene[name]
        assert x.dtype == np.float32 and x.shape == (mod.channels, 96, 96), name
        assert np.isfinite(x).all(), name
    assert scene["mask"].dtype == np.uint8 and scene["mask"].shape == (96, 96)
    assert set(np.unique(scene["mask"])) <= set(range(len(CLASSES)))
    assert scene["rgb"].min() >= 0 and scene["rgb"].max() <= 1


def test_render_scene_is_deterministic() -> None:
    a = render_scene(3, 7, 64, ("rgb", "nir", "dsm", "sar"))
    b = render_scene(3, 7, 64, ("rgb", "nir", "dsm", "sar"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = render_scene(3, 8, 64, ("rgb", "nir", "dsm", "sar"))
    for key in ("rgb", "nir", "dsm", "sar", "mask"):
        assert not np.array_equal(a[key], c[key]), key
    # a modality's values do not depend on which other modalities were requested
    only = render_scene(3, 7, 64, ("dsm",))
    assert list(only) == ["dsm", "mask"]
    np.testing.assert_array_equal(only["dsm"], a["dsm"])
    np.testing.assert_array_equal(only["mask"], a["mask"])


def test_dataset_sample_contract() -> None:
    ds = SyntheticScenes("train", num_samples=3, image_size=64, seed=1, modalities=("dsm", "rgb"))
    assert len(ds) == 3 and ds.classes == CLASSES and ds.palette == PALETTE
    assert ds.modalities == (MODALITIES["rgb"], MODALITIES["dsm"])  # canonical order
    sample = ds[0]
    assert set(sample) == {"rgb", "dsm", "mask"}
    assert sample["rgb"].dtype == torch.float32 and sample["rgb"].shape == (3, 64, 64)
    assert sample["dsm"].dtype == torch.float32 and sample["dsm"].shape == (1, 64, 64)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (64, 64)
    assert torch.equal(ds[-1]["mask"], ds[2]["mask"])
    assert torch.equal(ds[1]["rgb"], SyntheticScenes("train", num_samples=3, image_size=64, seed=1)[1]["rgb"])
    with pytest.raises(IndexError):
        ds[3]
    default = SyntheticScenes(num_samples=1, image_size=32)
    assert [m.name for m in default.modalities] == list(DEFAULT_MODALITIES)


def test_splits_and_seeds_are_disjoint() -> None:
    masks = {}
    for seed in (0, 1):
        for split in ("train", "val", "test"):
            ds = SyntheticScenes(split, num_samples=2, image_size=64, seed=seed, modalities=("rgb",))
            masks[(seed, split)] = [ds[i]["rgb"].numpy() for i in range(2)]
    items = [x for xs in masks.values() for x in xs]
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            assert not np.array_equal(items[i], items[j])


@pytest.mark.parametrize(("size", "nearest"), [(100, 96), (130, 128), (16, 32), (200, 192)])
def test_image_size_must_be_multiple_of_32(size: int, nearest: int) -> None:
    message = rf"dataset\.size={size} must be a positive multiple of 32.*use dataset\.size={nearest}$"
    with pytest.raises(ValueError, match=message):
        SyntheticScenes(num_samples=1, image_size=size)


def test_unknown_modality_and_split() -> None:
    with pytest.raises(ValueError, match=r"unknown modality 'lidar'.*rgb, nir, dsm, sar"):
        SyntheticScenes(num_samples=1, modalities=("rgb", "lidar"))
    with pytest.raises(ValueError, match=r"unknown modality 'depth'"):
        render_scene(0, 0, 32, ("depth",))
    with pytest.raises(ValueError, match=r"unknown split 'training'.*train, val, test"):
        SyntheticScenes("training", num_samples=1)


def test_class_frequencies() -> None:
    counts = np.zeros(len(CLASSES))
    for i in range(40):
        counts += np.bincount(render_scene(0, i, 128, ())["mask"].ravel(), minlength=len(CLASSES))
    freq = dict(zip(CLASSES, counts / counts.sum(), strict=True))
    bounds = {
        "impervious_surface": (0.22, 0.38),
        "building": (0.17, 0.33),
        "low_vegetation": (0.13, 0.28),
        "tree": (0.08, 0.23),
        "car": (0.01, 0.05),
        "clutter": (0.005, 0.05),
    }
    for name, (lo, hi) in bounds.items():
        assert lo <= freq[name] <= hi, f"{name}: {freq[name]:.3f} not in [{lo}, {hi}]"


def test_larger_scenes_show_more_area() -> None:
    scene = render_scene(0, 0, 256, ("rgb",))
    assert scene["rgb"].shape == (3, 256, 256)
    assert len(np.unique(scene["mask"])) == len(CLASSES)


def test_normalisation_constants_match_generator() -> None:
    for name, (mean, std) in measure_stats(num=40).items():
        mod = MODALITIES[name]
        np.testing.assert_allclose(mod.mean, mean, atol=0.1 * min(mod.std), err_msg=f"{name} mean")
        np.testing.assert_allclose(mod.std, std, rtol=0.12, err_msg=f"{name} std")


@pytest.fixture(scope="module")
def probe() -> dict[str, np.ndarray]:
    patterns = ["rgb", "nir", "dsm", "rgb+nir", "rgb+dsm", "rgb+nir+dsm"]
    return modality_probe(patterns, train=10, test=6, modalities=DEFAULT_MODALITIES)


def _miou(confusion: np.ndarray) -> float:
    return float(np.nanmean(iou_per_class(confusion)))


def test_rgb_dominates_and_combinations_help(probe: dict[str, np.ndarray]) -> None:
    miou = {p: _miou(c) for p, c in probe.items()}
    assert miou["rgb"] > miou["dsm"] + 0.05, miou
    assert miou["rgb"] > miou["nir"] + 0.15, miou
    assert miou["rgb+nir+dsm"] > miou["rgb"] + 0.12, miou
    assert miou["rgb+dsm"] > miou["rgb"] + 0.1, miou
    assert miou["dsm"] < 0.5 and miou["nir"] < 0.35, miou


def test_roof_vs_road_needs_dsm(probe: dict[str, np.ndarray]) -> None:
    rgb = pair_confusion(probe["rgb"], IMPERVIOUS, BUILDING)
    rgb_dsm = pair_confusion(probe["rgb+dsm"], IMPERVIOUS, BUILDING)
    assert rgb > 0.1, f"roofs and roads should be confusable in rgb alone ({rgb:.3f})"
    assert rgb_dsm < 0.4 * rgb, f"dsm should separate roofs from roads ({rgb_dsm:.3f} vs {rgb:.3f})"


def test_tree_vs_low_vegetation_needs_dsm(probe: dict[str, np.ndarray]) -> None:
    for pattern in ("rgb", "nir", "rgb+nir"):
        assert pair_confusion(probe[pattern], TREE, LOW_VEGETATION) > 0.1, pattern
    with_dsm = pair_confusion(probe["rgb+nir+dsm"], TREE, LOW_VEGETATION)
    assert with_dsm < 0.5 * pair_confusion(probe["rgb+nir"], TREE, LOW_VEGETATION)


def test_nir_separates_vegetation_only(probe: dict[str, np.ndarray]) -> None:
    iou = iou_per_class(probe["nir"])
    veg = [LOW_VEGETATION, TREE]
    conf = probe["nir"]
    is_veg = np.isin(np.arange(len(CLASSES)), veg)
    binary_acc = (conf[np.ix_(is_veg, is_veg)].sum() + conf[np.ix_(~is_veg, ~is_veg)].sum()) / conf.sum()
    assert binary_acc > 0.85, f"nir should split vegetation from the rest ({binary_acc:.3f})"
    assert np.nanmean(iou) < 0.35
