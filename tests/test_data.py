"""Modality dropout policies, samplers and the data module on the real synthetic dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgma.data.datamodule import MultiModalDataModule, PatternGridSampler, RandomPatternSampler
from sgma.data.missing import BernoulliDropout, FixedPattern, FullModalities, UniformPatterns
from sgma.data.synthetic import SyntheticScenes
from sgma.modalities import all_patterns

MODS = ("rgb", "nir", "dsm")
PATTERNS = all_patterns(MODS)


def draw(policy, n=20000, seed=0):
    policy.bind(MODS)
    return policy.draw(np.random.default_rng(seed), n)


def test_uniform_covers_all_patterns_evenly():
    counts = np.bincount(draw(UniformPatterns()), minlength=7) / 20000
    assert np.allclose(counts, 1 / 7, atol=0.01)


def test_uniform_over_a_subset():
    ids = draw(UniformPatterns(["rgb", "dsm+rgb"]))
    assert set(ids.tolist()) == {PATTERNS.index("rgb"), PATTERNS.index("rgb+dsm")}


def test_fixed_and_full():
    assert set(draw(FixedPattern("dsm+rgb")).tolist()) == {PATTERNS.index("rgb+dsm")}
    assert set(draw(FullModalities()).tolist()) == {PATTERNS.index("rgb+nir+dsm")}


def test_bernoulli_matches_the_conditional_law():
    ids = draw(BernoulliDropout(p={"rgb": 0.2, "nir": 0.5, "dsm": 0.5}), n=40000)
    drop = np.array([0.2, 0.5, 0.5])
    masks = np.array([[m in p.split("+") for m in MODS] for p in PATTERNS])
    law = np.prod(np.where(masks, 1 - drop, drop), axis=1)
    law /= law.sum()
    assert np.allclose(np.bincount(ids, minlength=7) / 40000, law, atol=0.01)


def test_policy_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown modality 'sar'.*rgb, nir, dsm"):
        FixedPattern("rgb+sar").bind(MODS)
    with pytest.raises(ValueError, match=r"\['sar'\]"):
        BernoulliDropout(p={"sar": 0.5}).bind(MODS)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        BernoulliDropout(p=1.0).bind(MODS)


def test_random_sampler_is_deterministic_per_epoch():
    policy = UniformPatterns()
    policy.bind(MODS)
    sampler = RandomPatternSampler(50, policy, seed=3)
    first = list(sampler)
    assert list(sampler) == first
    assert sorted(i for i, _, _ in first) == list(range(50))
    assert {epoch for _, _, epoch in first} == {0}  # training keys carry their epoch
    sampler.set_epoch(1)
    second = list(sampler)
    assert [(i, p) for i, p, _ in second] != [(i, p) for i, p, _ in first]
    assert {epoch for _, _, epoch in second} == {1}


def test_grid_sampler_visits_every_pair_once():
    keys = list(PatternGridSampler(4, [0, 5]))
    assert keys == [(i, p) for i in range(4) for p in (0, 5)]  # sample-major: a sample's patterns together


def make_dm(**kw) -> MultiModalDataModule:
    def factory(split, num_samples):
        return SyntheticScenes(split, num_samples=num_samples, image_size=64)

    splits = {"train": {"num_samples": 8}, "val": {"num_samples": 3}, "test": {"num_samples": 3}}
    return MultiModalDataModule(dataset=factory, splits=splits, batch_size=4, **kw)


def test_samples_zero_missing_and_flag_availability():
    dm = make_dm(missing=FixedPattern("rgb+dsm"))
    batch = next(iter(dm.train_dataloader()))
    assert batch["available"].tolist() == [[True, False, True]] * 4
    assert torch.count_nonzero(batch["nir"]) == 0
    assert batch["rgb"].dtype == torch.float32 and batch["rgb"].shape == (4, 3, 64, 64)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (4, 64, 64)
    assert (batch["pattern"] == PATTERNS.index("rgb+dsm")).all()
    # normalised with the dataset's statistics: roughly zero mean, unit spread
    assert abs(float(batch["rgb"].mean())) < 1.0 and 0.2 < float(batch["rgb"].std()) < 3.0


def test_eval_loader_iterates_every_pattern():
    dm = make_dm()
    seen = torch.cat([b["pattern"] for b in dm.val_dataloader()])
    assert torch.equal(torch.bincount(seen, minlength=7), torch.full((7,), 3))
    subset = torch.cat([b["pattern"] for b in dm.eval_dataloader("test", ["nir", "rgb+nir"])])
    assert set(subset.tolist()) == {PATTERNS.index("nir"), PATTERNS.index("rgb+nir")}


class CountingScenes(SyntheticScenes):
    """Synthetic scenes that count how often each one is rendered."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.reads: list[int] = []

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads.append(i)
        return super().__getitem__(i)


def test_eval_reads_each_sample_once_for_all_its_patterns():
    bases = {}

    def factory(split, num_samples):
        bases[split] = CountingScenes(split, num_samples=num_samples, image_size=64)
        return bases[split]

    splits = {"train": {"num_samples": 8}, "val": {"num_samples": 3}, "test": {"num_samples": 3}}
    dm = MultiModalDataModule(dataset=factory, splits=splits, batch_size=4, eval_batch_size=5)
    batches = list(dm.val_dataloader())
    assert bases["val"].reads == [0, 1, 2]  # 21 (sample, pattern) pairs in 5 batches, 3 scene renders
    keys = [(int(i), int(p)) for b in batches for i, p in zip(b["index"], b["pattern"], strict=True)]
    assert keys == [(i, p) for i in range(3) for p in range(7)]
    # the kept sample is never modified: every pattern's copy equals a fresh read under that pattern
    fresh = CountingScenes("val", num_samples=3, image_size=64)
    data = dm.dataset("val")
    for b in batches:
        for j, (i, p) in enumerate(zip(b["index"].tolist(), b["pattern"].tolist(), strict=True)):
            raw = fresh[i]
            assert torch.equal(b["mask"][j], raw["mask"])
            for name in MODS:
                if name in PATTERNS[p].split("+"):
                    mean, std = data.norm[name]
                    assert torch.allclose(b[name][j], (raw[name] - mean) / std)
                else:
                    assert not b[name][j].any()
    # a consumer writing into a sample cannot reach the kept raw sample that the next pattern reuses
    first = data[(2, 0)]
    first["mask"].fill_(0)
    first["rgb"].fill_(0)
    again = data[(2, PATTERNS.index("rgb"))]
    assert bases["val"].reads == [0, 1, 2]  # both served by the sample kept since the loader's last batch
    assert torch.equal(again["mask"], fresh[2]["mask"]) and again["rgb"].any()


def test_datamodule_facts_and_errors():
    dm = make_dm()
    assert [m.name for m in dm.modalities] == list(MODS)
    assert dm.num_classes == 6 and dm.classes[1] == "building"
    with pytest.raises(ValueError, match="unknown modality 'sar'"):
        make_dm(missing=FixedPattern("sar"))
    with pytest.raises(ValueError, match="unknown modality 'sar'"):
        make_dm(val_patterns=["rgb", "sar"])
    with pytest.raises(ValueError, match="unknown split"):
        dm.dataset("holdout")
