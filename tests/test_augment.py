"""Training augmentation and fresh per-epoch crops (sgma.data.augment, the datamodule's training keys)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgma.data.augment import Augment, Draw
from sgma.data.datamodule import IncompleteModalityDataset, MultiModalDataModule
from sgma.data.fake import make_fake_folder
from sgma.data.folder import FolderDataset
from sgma.data.synthetic import SyntheticScenes
from sgma.data.tiles import random_window, read_window
from sgma.modalities import Modality, all_patterns

BLOCK = 16  # the coordinate scene's mask is constant on BLOCK x BLOCK blocks


class CoordinateScenes(torch.utils.data.Dataset):
    """A test pattern whose modalities encode their pixel coordinates: ``yx`` (2 channels: row, column), an
    optical ``rgb`` (row, column, constant, on a 0..255 scale), a categorical ``block`` (the block id) and the
    mask (the block id): after any geometric transform every output pixel must still agree across them."""

    classes = tuple(f"c{i}" for i in range(100))
    palette = tuple((i, i, i) for i in range(100))

    def __init__(self, size: int = 160, crop: int = 64, num_samples: int = 8, seed: int = 0) -> None:
        self.size, self.crop_size, self.num_samples, self.seed = size, crop, num_samples, seed
        self.modalities = (
            Modality("yx", 2, (80.0, 80.0), (40.0, 40.0), "other"),
            Modality("rgb", 3, (100.0,) * 3, (50.0,) * 3, "optical", 255.0),
            Modality("block", 1, (0.0,), (1.0,), "categorical"),
        )
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        blocks = (y // BLOCK) * 10 + (x // BLOCK)
        self.scene = {
            "yx": np.stack([y, x]),
            "rgb": np.stack([y, x, np.full_like(y, 50.0)]),
            "block": blocks[None],
            "mask": blocks.astype(np.int64),
        }

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample(index)

    def sample(self, index, epoch=0, window=None, names=None):
        window = window or self.crop_size
        win = random_window({"scene": (self.size, self.size)}, window, self.seed, index, epoch)
        names = [m.name for m in self.modalities] if names is None else names
        # the training protocol: the window clipped to the scene, not padded (the augmentation pads)
        out = {n: torch.from_numpy(read_window(self.scene[n], win.y, win.x, window, None)) for n in names}
        out["mask"] = torch.from_numpy(read_window(self.scene["mask"], win.y, win.x, window, None))
        return out


def block_of(yx: torch.Tensor) -> torch.Tensor:
    """The block id of each pixel from its (row, column) coordinates."""
    return (torch.floor(yx[0] / BLOCK) * 10 + torch.floor(yx[1] / BLOCK)).long()


def assert_aligned(sample: dict[str, torch.Tensor], *, zoomed: bool) -> None:
    """Every modality and the mask describe the same place at every pixel (away from block borders when the
    sample was resampled, where bilinear coordinates and nearest labels may round to neighbouring blocks)."""
    yx, mask, block = sample["yx"], sample["mask"], sample["block"][0].round().long()
    valid = mask != 255
    assert valid.float().mean() > 0.2
    assert torch.equal(block[valid], mask[valid])  # categorical raster and mask: both nearest, identical
    from_coords = block_of(yx)
    if zoomed:
        inner = ((yx % BLOCK) > 2) & ((yx % BLOCK) < BLOCK - 2)
        keep = valid & inner[0] & inner[1]
        assert keep.sum() > 50
        assert torch.equal(from_coords[keep], mask[keep])
    else:
        assert torch.equal(from_coords[valid], mask[valid])
    # the optical modality was resampled exactly like the other continuous ones (jitter is off here)
    assert torch.allclose(sample["rgb"][:2], yx, atol=1e-3)


DRAWS = {
    "identity": Draw(window=64),
    "hflip": Draw(window=64, hflip=True),
    "vflip": Draw(window=64, vflip=True),
    "turn1": Draw(window=64, quarter_turns=1),
    "turn2": Draw(window=64, quarter_turns=2),
    "turn3": Draw(window=64, hflip=True, quarter_turns=3),
    "zoom_in": Draw(window=32, vflip=True),  # zoom 2: a 32 px window enlarged to 64
    "zoom_out": Draw(window=128, quarter_turns=1),  # zoom 0.5: a 128 px window shrunk to 64
    "zoom_out_padded": Draw(window=224),  # larger than the 160 px scene: padded with ignore labels
}


@pytest.mark.parametrize("name", list(DRAWS))
def test_geometry_moves_every_modality_and_the_mask_together(name):
    scenes = CoordinateScenes()
    draw = DRAWS[name]
    raw = scenes.sample(3, epoch=1, window=draw.window)
    out = Augment()(raw, draw, scenes.modalities, scenes.crop_size)
    assert all(out[k].shape[-2:] == (64, 64) for k in out)
    assert_aligned(out, zoomed=draw.window != 64)
    if name == "hflip":  # columns now decrease left to right, rows are unchanged
        assert torch.equal(out["yx"][1], raw["yx"][1].flip(-1)) and torch.equal(out["yx"][0], raw["yx"][0])
    if name == "turn2":
        assert torch.equal(out["mask"], raw["mask"].flip(-1).flip(-2))
    if name == "zoom_out_padded":
        assert (out["mask"] == 255).any() and (out["mask"] != 255).any()


def test_random_augmentation_keeps_alignment_through_the_dataset():
    scenes = CoordinateScenes()
    augment = Augment(scale=(0.5, 2.0), hflip=0.5, vflip=0.5, rotate90=True)
    data = IncompleteModalityDataset(scenes, augment=augment, seed=5)
    full = len(data.patterns) - 1
    windows = set()
    for epoch in range(3):
        for index in range(4):
            sample = data[(index, full, epoch)]
            raw = {
                m.name: sample[m.name] * torch.tensor(m.std).view(-1, 1, 1) + torch.tensor(m.mean).view(-1, 1, 1)
                for m in scenes.modalities
            }
            raw["mask"] = sample["mask"]
            assert_aligned(raw, zoomed=True)
            windows.add(augment.draw(np.random.default_rng((5, epoch, index, data.AUGMENT_STREAM)), 64).window)
    assert len(windows) > 3  # the zoom really varied


def test_photometric_jitter_touches_only_optical_modalities():
    scenes = SyntheticScenes("train", num_samples=4, image_size=64, modalities="rgb+nir+dsm+sar")
    jitter = Augment(
        jitter={"p": 1.0, "brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.2}, blur={"p": 1.0}
    )
    raw = scenes.sample(1, epoch=0)
    draw = jitter.draw(np.random.default_rng(0), 64)
    assert draw.brightness is not None and draw.blur_sigma is not None
    out = jitter({k: v.clone() for k, v in raw.items()}, draw, scenes.modalities, 64)
    for name in ("dsm", "sar", "mask"):
        assert torch.equal(out[name], raw[name]), name
    for name in ("rgb", "nir"):
        assert not torch.allclose(out[name], raw[name]), name
        assert out[name].min() >= 0 and out[name].max() <= 1.0  # reflectance: value_max 1.0
    nothing = Augment()
    assert torch.equal(
        nothing(raw, nothing.draw(np.random.default_rng(0), 64), scenes.modalities, 64)["rgb"], raw["rgb"]
    )


def test_missing_modalities_stay_exactly_zero_under_paper_augmentation():
    scenes = SyntheticScenes("train", num_samples=6, image_size=64)
    augment = Augment(scale=(0.5, 2.0), hflip=0.5, jitter={"p": 1.0, "brightness": 0.3}, blur={"p": 1.0})
    data = IncompleteModalityDataset(scenes, augment=augment, seed=0)
    for pid, pattern in enumerate(data.patterns):
        for epoch in range(2):
            sample = data[(2, pid, epoch)]
            for m in data.modalities:
                if m.name not in pattern.split("+"):
                    assert torch.count_nonzero(sample[m.name]) == 0 and sample[m.name].shape == (m.channels, 64, 64)
                else:
                    assert torch.count_nonzero(sample[m.name]) > 0


def make_folder_data(tmp_path, seed: int = 0) -> FolderDataset:
    root = make_fake_folder(tmp_path / "folder", num_images=4, size=96)
    return FolderDataset("train", root=root, crop_size=32, num_samples=6, seed=seed, progress=False)


def test_same_index_draws_fresh_crops_every_epoch(tmp_path):
    base = make_folder_data(tmp_path)
    windows = [base.crops.window(0, epoch) for epoch in range(6)]
    assert len({(w.tile, w.y, w.x) for w in windows}) > 1
    assert base.crops.window(0, 3) == windows[3]  # a function of (seed, epoch, index)
    data = IncompleteModalityDataset(base, augment=Augment(), seed=0)
    full = len(data.patterns) - 1
    assert not torch.equal(data[(0, full, 0)]["mask"], data[(0, full, 1)]["mask"]) or not torch.equal(
        data[(0, full, 0)]["rgb"], data[(0, full, 1)]["rgb"]
    )


def test_augment_none_serves_the_crop_as_read(tmp_path):
    """augment=none: a training sample is its epoch's window read and normalised, nothing else; evaluation keys
    (no epoch) still read ``base[index]`` exactly as before."""
    base = make_folder_data(tmp_path)
    data = IncompleteModalityDataset(base, augment=Augment(), seed=0)
    full = len(data.patterns) - 1
    for epoch in (0, 2):
        sample = data[(1, full, epoch)]
        win = base.crops.window(1, epoch)
        for m in base.modalities:
            stored = read_window(base.cache.array(win.tile, m.name), win.y, win.x, win.size).astype(np.float32)
            mean, std = np.array(m.mean)[:, None, None], np.array(m.std)[:, None, None]
            np.testing.assert_allclose(sample[m.name].numpy(), (stored - mean) / std, rtol=1e-5, atol=1e-5)
    eval_sample = data[(1, full)]
    raw = base[1]
    assert torch.equal(eval_sample["mask"], raw["mask"])


def test_images_smaller_than_the_crop_are_padded_after_any_augmentation(tmp_path):
    root = make_fake_folder(tmp_path / "folder", num_images=4, size=80)
    base = FolderDataset("train", root=root, crop_size=128, num_samples=4, progress=False)
    for augment in (Augment(), Augment(scale=(0.5, 2.0), hflip=0.5, rotate90=True)):
        data = IncompleteModalityDataset(base, augment=augment, seed=0)
        for epoch in range(4):
            sample = data[(0, len(data.patterns) - 1, epoch)]
            assert sample["mask"].shape == (128, 128) and sample["rgb"].shape == (3, 128, 128)
            draw = augment.draw(np.random.default_rng((0, epoch, 0, data.AUGMENT_STREAM)), 128)
            assert (sample["mask"] != 255).any()
            assert bool((sample["mask"] == 255).any()) == (draw.window > 80)  # the window outgrew the image


def make_dm(augment: Augment, **kw) -> MultiModalDataModule:
    def factory(split, num_samples):
        return SyntheticScenes(split, num_samples=num_samples, image_size=64)

    splits = {"train": {"num_samples": 8}, "val": {"num_samples": 2}, "test": {"num_samples": 2}}
    return MultiModalDataModule(dataset=factory, splits=splits, batch_size=4, augment=augment, seed=7, **kw)


def epoch_batches(dm: MultiModalDataModule, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader = dm.train_dataloader()
    dm.train_sampler.set_epoch(epoch)
    return list(loader)


PAPER = {
    "scale": (0.5, 2.0),
    "hflip": 0.5,
    "jitter": {"p": 0.5, "brightness": 0.3, "contrast": 0.3},
    "blur": {"p": 0.2},
}


def test_same_seed_and_epoch_give_identical_batches_with_workers():
    single = epoch_batches(make_dm(Augment(**PAPER)), 1)
    workers = epoch_batches(make_dm(Augment(**PAPER), num_workers=2), 1)
    other_epoch = epoch_batches(make_dm(Augment(**PAPER)), 2)
    assert len(single) == len(workers) == 2
    for a, b in zip(single, workers, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(single[0]["rgb"], other_epoch[0]["rgb"])


def test_fresh_synthetic_scenes_change_every_epoch_only_when_asked():
    fixed = SyntheticScenes("train", num_samples=4, image_size=64)
    fresh = SyntheticScenes("train", num_samples=4, image_size=64, fresh_scenes=True)
    assert torch.equal(fixed.sample(1, 0)["mask"], fixed.sample(1, 3)["mask"])
    assert torch.equal(fixed.sample(1, 0)["mask"], fresh.sample(1, 0)["mask"])  # epoch 0 is the fixed set
    assert not torch.equal(fresh.sample(1, 0)["mask"], fresh.sample(1, 3)["mask"])
    assert torch.equal(fresh.sample(1, 3)["rgb"], fresh.sample(1, 3)["rgb"])
    assert not SyntheticScenes("val", num_samples=4, image_size=64, fresh_scenes=True).fresh_scenes


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scale": (2.0, 0.5)}, "0 < low <= high"),
        ({"hflip": 1.5}, r"hflip must be a probability"),
        ({"jitter": {"p": 0.5, "gamma": 0.1}}, "unknown keys"),
        ({"jitter": {"hue": 0.7}}, r"hue must be >= 0 and <= 0.5"),
        ({"blur": {"kernel": 4}}, "odd number"),
    ],
)
def test_bad_augment_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Augment(**kwargs)


def test_optical_modality_needs_its_full_brightness_value():
    with pytest.raises(ValueError, match="needs value_max > 0"):
        Modality("rgb", 3, (0.0,) * 3, (1.0,) * 3, "optical")
    with pytest.raises(ValueError, match="kind must be one of"):
        Modality("rgb", 3, (0.0,) * 3, (1.0,) * 3, "colour")


def test_all_patterns_of_the_coordinate_scene_are_served():
    scenes = CoordinateScenes()
    data = IncompleteModalityDataset(scenes, augment=Augment(rotate90=True), seed=0)
    assert data.patterns == all_patterns(scenes.modalities)
    for pid in range(len(data.patterns)):
        assert data[(0, pid, 0)]["mask"].shape == (64, 64)


def test_training_keys_need_an_augment():
    data = IncompleteModalityDataset(SyntheticScenes("train", num_samples=2, image_size=64))
    assert data[(0, 0)]["mask"].shape == (64, 64)  # evaluation keys are fine
    with pytest.raises(ValueError, match=r"built without augment.*Augment\(\) = none"):
        data[(0, 0, 1)]
