"""DELIVER on a fake tree laid out as the release: discovery, CMNeXt resize, eventlowres, RGBA labels, palette,
manifest-only mode, one message for missing files, the disk check, training."""

from __future__ import annotations

import logging
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import bind_to, compose_config
from sgma.data.deliver import (
    CLASSES,
    CONDITIONS,
    PALETTE,
    Deliver,
    decode_label,
    frame_files,
    resized_shape,
)
from sgma.data.fake import make_fake_deliver
from sgma.data.fake.deliver import LOWRES_SEQUENCE
from sgma.data.tiles import CACHE_VERSION, MANIFEST, TilePreparationError
from sgma.modalities import all_patterns

LOWRES_VAL = f"val__cloud__{LOWRES_SEQUENCE}__000000_front"


def _ds(root, split="train", **kw):
    kw.setdefault("resize", 64)
    return Deliver(split, root=root, crop_size=64, progress=False, **kw)


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _files(root, tile):
    split, condition, sequence, rest = tile.split("__")
    frame, view = rest.rsplit("_", 1)
    return frame_files(root / "DELIVER", condition, split, sequence, frame, view)


@pytest.fixture(scope="module")
def deliver_root(tmp_path_factory):
    """The release tree unzipped into <root>/DELIVER/ (the loader finds the folder holding img/)."""
    return make_fake_deliver(tmp_path_factory.mktemp("data"), nested=True)


@pytest.fixture
def fresh(tmp_path):
    return make_fake_deliver(tmp_path / "data", counts=(1, 1, 0), eventlowres=False)


def test_release_tree_resized_as_cmnext(deliver_root, caplog):
    with caplog.at_level(logging.INFO, logger="sgma"):
        ds = _ds(deliver_root)
    assert ds.folder == deliver_root / "DELIVER"
    assert [m.name for m in ds.modalities] == ["rgb", "depth", "event", "lidar"]
    assert all(m.channels == 3 for m in ds.modalities) and ds.num_classes == 25 and ds.classes == CLASSES
    assert len(ds.images) == 2 * len(CONDITIONS) + 1  # + the eventlowres frame
    assert set(ds.crops.shapes.values()) == {(64, 64)}  # 66 -> 64: shortest side to 64, then a multiple of 32
    assert len(ds) == len(ds.images)  # area / crop^2
    assert "train__cloud__MAP_1_point0__000000_front" in ds.images
    sample = ds[0]
    assert set(sample) == {"rgb", "depth", "event", "lidar", "mask"}
    assert all(sample[m].shape == (3, 64, 64) and sample[m].dtype == torch.float32 for m in ("rgb", "event"))
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (64, 64)
    assert ds.manifest["options"]["resize"] == 64 and ds.manifest["stats"]["split"] == "train"
    assert ds.cache.dir.name == f"deliver-resize64-v{CACHE_VERSION}" and (ds.cache.dir / MANIFEST).is_file()
    assert "1 of 11 frames have smaller event images (e.g. 33 x 33" in caplog.text
    val, test = _ds(deliver_root, "val"), _ds(deliver_root, "test")
    assert len(val) == len(test) == len(CONDITIONS) + 1  # one whole 64 px frame per window
    assert val.window(0).own == (0, 64, 0, 64)
    assert [m.name for m in _ds(deliver_root, modalities="lidar+rgb").modalities] == ["rgb", "lidar"]
    assert resized_shape(1042, 1042, 1024) == ((1024, 1024), (1024, 1024))  # the real frames
    assert resized_shape(70, 100, 64) == ((64, 91), (64, 96))  # two steps, as CMNeXt's Resize
    mask = val.cache.array(LOWRES_VAL, "mask")  # nearest: only values of the native label
    native = decode_label(_png(_files(deliver_root, LOWRES_VAL)["semantic"]))[0]
    assert set(np.unique(mask)) <= set(np.unique(native))


def test_native_frames_sliding_window(deliver_root):
    ds = _ds(deliver_root, "val", resize=None)
    assert set(ds.crops.shapes.values()) == {(66, 66)} and ds.cache.dir.name == f"deliver-native-v{CACHE_VERSION}"
    assert len(ds) == 4 * len(ds.images)  # 2 x 2 windows of 64 px over 66 px frames
    for tile in ds.images:
        files = _files(deliver_root, tile)
        semantic = _png(files["semantic"])
        assert semantic.shape == (66, 66, 4) and (semantic[..., 3] == 255).all()  # RGBA as released
        raw = semantic[..., 0].astype(np.int64)
        assert np.array_equal(ds.cache.array(tile, "mask"), np.where(raw == 0, 255, raw - 1))
        hha = _png(files["depth"]).transpose(2, 0, 1)  # depth is hha/, not the depth/ folder
        assert np.array_equal(ds.cache.array(tile, "depth"), hha)
    event = _png(_files(deliver_root, LOWRES_VAL)["event"])
    assert event.shape == (33, 33, 3)  # *_eventlowres: half size, resized nearest to the frame
    big = np.repeat(np.repeat(event, 2, 0), 2, 1).transpose(2, 0, 1)
    assert np.array_equal(ds.cache.array(LOWRES_VAL, "event"), big)
    assert ds.manifest["tiles"][LOWRES_VAL]["info"]["event_resized_from"] == [33, 33]
    owned = sum(int((ds[i]["mask"] != -1).sum()) for i in range(len(ds)))  # windows partition the frames
    assert owned == 64 * 64 * len(ds)
    scored = sum(int((ds[i]["mask"] != 255).sum()) for i in range(len(ds)))
    assert scored == sum(int((ds.cache.array(t, "mask") != 255).sum()) for t in ds.images)


def test_labels_and_palette():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = [[0, 1, 25], [26, 255, 7]]
    rgba[..., 3] = 255
    ids, unknown = decode_label(rgba)
    assert ids.tolist() == [[255, 0, 24], [255, 255, 6]] and unknown == 1  # 255 is DELIVER's ignore, not counted
    assert decode_label(np.array([[0, 7]], np.uint8))[0].tolist() == [[255, 6]]  # grey png
    colours = dict(zip(CLASSES, PALETTE, strict=True))
    assert len(PALETTE) == 25 and colours["fence"] == (100, 40, 40) and colours["other"] == (55, 90, 80)
    assert colours["roadline"] == (157, 234, 50) and colours["building"] == (70, 70, 70)
    assert colours["truck"] == (0, 0, 70) and colours["twowheeler"] == (0, 0, 230)


def test_condition_filter(deliver_root):
    ds = _ds(deliver_root, conditions=["fog", "sun"])
    assert ds.conditions == ("fog", "sun") and len(ds.images) == 4
    assert {t.split("__")[1] for t in ds.images} == {"fog", "sun"}
    assert ds.cache.dir.name == f"deliver-fog+sun-resize64-v{CACHE_VERSION}"
    assert _ds(deliver_root, "val", conditions="night").images == ["val__night__MAP_1_point1__000000_front"]
    with pytest.raises(ValueError, match=r"dataset\.builder\.conditions: unknown DELIVER condition"):
        _ds(deliver_root, conditions=["snow"])


def test_manifest_only_serves_the_same_samples(tmp_path, caplog):
    root = make_fake_deliver(tmp_path / "data", counts=(2, 1, 0))
    full, lazy = _ds(root), _ds(root, cache=False)
    assert lazy.cache.dir.name == f"deliver-resize64-manifest-v{CACHE_VERSION}"
    assert [p.name for p in lazy.cache.dir.iterdir()] == [MANIFEST] and not lazy.manifest["arrays_stored"]
    assert lazy.manifest["stats"] == full.manifest["stats"] and lazy.crops.shapes == full.crops.shapes
    clone = pickle.loads(pickle.dumps(lazy))  # what a DataLoader worker gets
    for ds in (lazy, clone):
        for i in range(len(ds)):
            a, b = full[i], ds[i]
            assert all(torch.equal(a[k], b[k]) for k in a)
    val_full, val_lazy = _ds(root, "val"), _ds(root, "val", cache=False)
    assert all(torch.equal(val_full[i]["event"], val_lazy[i]["event"]) for i in range(len(val_full)))
    shared = tmp_path / "shared"  # one folder used both ways: rebuilt, never mixed
    _ds(root, cache=False, cache_dir=shared)
    with caplog.at_level(logging.WARNING, logger="sgma"):
        assert _ds(root, cache_dir=shared).manifest["arrays_stored"]
    assert "holds only a manifest, this run wants arrays" in caplog.text


def test_missing_files_one_message(fresh):
    lidar = frame_files(fresh, "sun", "val", "MAP_1_point1", "000000", "front")["lidar"]
    hha = frame_files(fresh, "cloud", "train", "MAP_1_point0", "000000", "front")["depth"]
    lidar.unlink()
    hha.unlink()
    hha.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        _ds(fresh)
    text = str(err.value)
    assert "(10 frames found for condition(s) cloud, fog, night, rain, sun)" in text
    assert "- lidar (lidar/<condition>/<split>/<sequence>/<frame>_lidar_<view>.png): 9/10 found; 1 missing" in text
    assert "lidar/sun/val/MAP_1_point1/000000_lidar_front.png is missing" in text
    assert "hha/cloud/train/MAP_1_point0/000000_depth_front.png is a directory, not a file" in text
    assert "not depth/" in text and "- labels (semantic/" in text and "10/10 found" in text
    assert "searched" in text and "dataset.builder.skip_incomplete=true" in text
    with pytest.warns(UserWarning, match=r"dropping 2 of 10 frame\(s\) .*val/sun/MAP_1_point1/000000_front"):
        assert len(_ds(fresh, "val", skip_incomplete=True).images) == 4


def test_errors(tmp_path, fresh):
    for root in (tmp_path / "absent", None):
        with pytest.raises(FileNotFoundError, match=r"(?s)DELIVER/CMNeXt.*Expected tree"):
            Deliver("train", root=root, crop_size=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        _ds(tmp_path / "empty")
    (tmp_path / "other" / "photos").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no folder holding both img/ and semantic/"):
        _ds(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"no complete test frame .*'train': 5, 'val': 5"):
        _ds(fresh, "test")
    with pytest.raises(ValueError, match="multiple of 32"):
        Deliver("train", root=fresh, crop_size=100)
    for bad in (16, "big", 1.5):
        with pytest.raises(ValueError, match=r"dataset\.builder\.resize=.* or null"):
            _ds(fresh, resize=bad)
    with pytest.raises(ValueError, match=r"dataset\.builder\.cache='yes' must be true or false"):
        _ds(fresh, cache="yes")
    event = frame_files(fresh, "cloud", "train", "MAP_1_point0", "000000", "front")["event"]
    Image.fromarray(np.zeros((33, 33, 3), np.uint8)).save(event)  # small event outside *_eventlowres
    with pytest.raises(ValueError, match=r"size mismatch: .*000000_event_front\.png is 33 x 33 px"):
        _ds(fresh)
    event.write_bytes(b"not a png")
    with pytest.raises(OSError, match=r"cannot read .*000000_event_front\.png .*truncated or corrupt"):
        _ds(fresh)
    twice = make_fake_deliver(tmp_path / "two" / "a", counts=(1, 0, 0), conditions=("fog",), eventlowres=False)
    make_fake_deliver(tmp_path / "two" / "b", counts=(1, 0, 0), conditions=("fog",), eventlowres=False)
    with pytest.raises(ValueError, match=r"several DELIVER folders"):
        _ds(twice.parent)


def test_lowres_only_for_event(tmp_path):
    root = make_fake_deliver(tmp_path / "data", counts=(1, 0, 0), conditions=("rain",))
    lidar = frame_files(root, "rain", "train", LOWRES_SEQUENCE, "000000", "front")["lidar"]
    Image.fromarray(np.zeros((33, 33, 3), np.uint8)).save(lidar)
    with pytest.raises(ValueError, match=r"lidar_front\.png is 33 x 33 px .*only event images of \*_eventlowres"):
        _ds(root, conditions="rain")


def test_disk_estimate_and_hint(fresh):
    class Huge(Deliver):  # a cache no disk holds
        bytes_per_pixel = 10**15

    with pytest.raises(TilePreparationError, match=r"needs about .*set dataset\.builder\.cache=false"):
        Huge("train", root=fresh, crop_size=64, resize=64, progress=False)
    assert Huge("train", root=fresh, crop_size=64, resize=64, cache=False, progress=False).images
    ds = _ds(fresh)
    tile = ds.images[0]
    assert ds._check_sizes(tile, ds.cache.sources[tile]) == (64, 64)  # the estimate counts the cached size
    native = _ds(fresh, resize=None)
    assert native._check_sizes(tile, native.cache.sources[tile]) == (66, 66)


def test_train_on_fake_deliver(deliver_root, tmp_path):
    overrides = ["debug=tiny", "dataset=deliver", f"dataset.builder.root={deliver_root}", "model=baseline"]
    overrides += ["logger=csv", "missing=uniform", "dataset.builder.progress=false", "dataset.builder.resize=64"]
    overrides += ["dataset.builder.cache=false", "data.num_workers=0"]  # frames decoded in a worker process
    cfg = compose_config("train", overrides)
    assert cfg.dataset.builder.crop_size == 64
    cfg = bind_to(cfg, tmp_path)
    from sgma.tasks import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics, objects = train(cfg)
    patterns = all_patterns(["rgb", "depth", "event", "lidar"])
    assert len(patterns) == 15
    rows = (tmp_path / "patterns.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:] if r.split(",")[0] in patterns] == patterns  # 15 pattern rows
    assert objects["datamodule"].classes == CLASSES
    assert 0 <= metrics["test/avg/miou"] <= 1


def test_frames_without_rgb_are_missing(fresh):
    base = fresh
    shutil.rmtree(base / "img" / "fog")  # one img archive not extracted: fog has only its other files
    rgb = frame_files(base, "cloud", "val", "MAP_1_point1", "000000", "front")["rgb"]
    rgb.unlink()
    with pytest.raises(FileNotFoundError) as err:
        _ds(base)
    text = str(err.value)
    assert "- rgb (img/<condition>/<split>/<sequence>/<frame>_rgb_<view>.png): 7/10 found; 3 missing" in text
    assert "img/cloud/val/MAP_1_point1/000000_rgb_front.png is missing" in text
    assert "img/fog/train/MAP_1_point0/000000_rgb_front.png is missing" in text
    assert "Extract the missing files again" in text
    for folder in ("hha", "event", "lidar", "semantic"):  # fog gone from every folder: a smaller dataset
        shutil.rmtree(base / folder / "fog")
    for folder in ("img", "hha", "event", "lidar", "semantic"):  # and one split of another condition
        shutil.rmtree(base / folder / "sun" / "val")
    with pytest.raises(
        FileNotFoundError, match=r"no frame of fog/train, fog/val, sun/val in the DELIVER folder"
    ) as err:
        _ds(base)
    assert "set dataset.builder.conditions=[cloud, night, rain] to use only those" in str(err.value)
    rgb.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((66, 66, 3), np.uint8)).save(rgb)
    assert {t.split("__")[1] for t in _ds(base, conditions="cloud+rain").images} == {"cloud", "rain"}  # a subset


def test_other_copy_named(tmp_path):
    root = make_fake_deliver(tmp_path / "data", counts=(1, 1, 0), nested=True, eventlowres=False)
    shutil.copytree(root / "DELIVER", root / "backup" / "DELIVER")  # the complete copy, one level deeper
    shutil.rmtree(root / "DELIVER" / "img" / "night")
    with pytest.raises(FileNotFoundError) as err:
        _ds(root)
    text = str(err.value)
    assert "img/night/train/MAP_1_point0/000000_rgb_front.png is missing" in text
    assert f"the root also holds the DELIVER folder(s) '{root / 'backup' / 'DELIVER'}', not read" in text
    assert "set dataset.builder.root to it" in text


def test_out_of_range_labels(fresh):
    semantic = frame_files(fresh, "sun", "train", "MAP_1_point0", "000000", "front")["semantic"]
    label = _png(semantic).copy()
    label[0, :3, 0] = (200, 26, 200)  # 3 stray values: warned, ignored, counted
    Image.fromarray(label).save(semantic)
    with pytest.warns(
        UserWarning, match=r"000000_semantic_front\.png: 3 pixel\(s\) with label values outside 0\.\.25 "
    ):
        ds = _ds(fresh)
    assert ds.manifest["tiles"]["train__sun__MAP_1_point0__000000_front"]["info"]["out_of_range_label_pixels"] == 3
    with pytest.warns(UserWarning, match=r"values outside 0\.\.25 and 255 \(26, 200\) set to ignore"):
        _ds(fresh, resize=None)
    for condition in ("cloud", "fog"):  # labels rendered in DELIVER's colours instead of the class + 1
        files = frame_files(fresh, condition, "train", "MAP_1_point0", "000000", "front")
        ids = decode_label(_png(files["semantic"]))[0]
        colour = np.array((*PALETTE, *[(0, 0, 0)] * 231), np.uint8)[ids]
        Image.fromarray(colour).save(files["semantic"])
    with pytest.warns(UserWarning), pytest.raises(TilePreparationError) as err:
        _ds(fresh, cache_dir=fresh / "cache")
    text = str(err.value)
    assert "train label pixels in 1 file(s) so far (e.g. " in text and "semantic/cloud/train/MAP_1_point0/" in text
    assert "outside 0..25 and 255 (45, 55, 70, 81, 100, 102, 107, 110, ... (" in text  # the palette's reds, counted
    assert "more than dataset.builder.max_out_of_range=0.01" in text and not (fresh / "cache").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _ds(fresh, max_out_of_range=0.5).images  # a looser limit, stored in the cache options
    with pytest.raises(ValueError, match=r"dataset\.builder\.max_out_of_range=2 must be a share between 0 and 1"):
        _ds(fresh, max_out_of_range=2)
