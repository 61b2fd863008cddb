"""MAS-weighted sampler and robustness memory: the law, the draw, sharding, resume and a real gloo commit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sgma.data.datamodule import RandomPatternSampler
from sgma.data.mas import MASSampler, RobustnessMemory
from sgma.data.missing import UniformPatterns
from sgma.modalities import all_patterns

MODS = ("rgb", "nir", "dsm")
PATTERNS = all_patterns(MODS)  # rgb, nir, dsm, rgb+nir, rgb+dsm, nir+dsm, rgb+nir+dsm
DSM = MODS.index("dsm")
WITH_DSM = [i for i, p in enumerate(PATTERNS) if "dsm" in p.split("+")]
CHI2_DF6_P001 = 22.46  # chi-square quantile, 6 degrees of freedom, p = 0.001

N = 60
FRAGILE = np.arange(10)  # samples on which dsm is fragile
FRAGILE_RHO = (1.35, 1.35, 0.3)  # relative robustness: mean 1 over the three modalities


def bound_policy() -> UniformPatterns:
    policy = UniformPatterns()
    policy.bind(MODS)
    return policy


def set_rho(memory: RobustnessMemory, rho: torch.Tensor | np.ndarray) -> None:
    """Hand-set the memory through its public state interface."""
    state = memory.state_dict()
    state["values"] = torch.as_tensor(rho, dtype=torch.float32)
    memory.load_state_dict(state)


def fragile_memory(n: int = N) -> RobustnessMemory:
    memory = RobustnessMemory(n, len(MODS))
    rho = torch.ones(n, len(MODS))
    rho[FRAGILE] = torch.tensor(FRAGILE_RHO)
    set_rho(memory, rho)
    return memory


def make_sampler(memory: RobustnessMemory | None = None, n: int = N, **kwargs) -> MASSampler:
    memory = memory if memory is not None else RobustnessMemory(n, len(MODS))
    return MASSampler(n, bound_policy(), memory, **kwargs)


def chi_square_uniform(ids: np.ndarray, k: int) -> float:
    counts = np.bincount(ids, minlength=k)
    expected = len(ids) / k
    return float(((counts - expected) ** 2 / expected).sum())


# the law --------------------------------------------------------------------------------------------------
def test_fragile_samples_and_their_fragile_patterns_are_favoured():
    sampler = make_sampler(fragile_memory(), warmup_epochs=0, floor=0.2, mix=0.2)
    assert sampler.active
    p, q = sampler.probabilities()
    others = np.setdiff1d(np.arange(N), FRAGILE)
    assert np.isclose(p.sum(), 1.0) and np.allclose(q.sum(axis=1), 1.0)
    assert p[FRAGILE].min() > p[others].max()
    assert np.all(p >= 0.2 / N - 1e-15)
    assert np.all(q >= 0.2 / len(PATTERNS) - 1e-15)
    # fragile samples: dsm alone is the likeliest pattern, and every pattern with dsm beats every one without
    fq = q[FRAGILE]
    assert np.all(fq.argmax(axis=1) == PATTERNS.index("dsm"))
    without = [i for i in range(len(PATTERNS)) if i not in WITH_DSM]
    assert fq[:, WITH_DSM].min() > fq[:, without].max()
    assert np.allclose(q[others], 1 / len(PATTERNS))  # uniform robustness on the others: uniform patterns
    # the summaries the training loop logs point at dsm
    assert sampler.modality_probabilities().argmax() == DSM
    share = sampler.fragile_modality_share()
    assert np.isclose(share.sum(), 1.0) and share.argmax() == DSM

    # empirically: systematic resampling gives floor/ceil(N p_i) draws per epoch, and the pattern law holds
    epochs = 300
    draws = np.zeros(N)
    fragile_patterns = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        keys = np.array(sampler.epoch_keys())
        assert len(keys) == N
        counts = np.bincount(keys[:, 0], minlength=N)
        assert np.all(counts >= np.floor(N * p - 1e-9)) and np.all(counts <= np.ceil(N * p + 1e-9))
        draws += counts
        fragile_patterns.append(keys[np.isin(keys[:, 0], FRAGILE), 1])
    assert draws[FRAGILE].min() > draws[others].max()
    assert np.allclose(draws / epochs, N * p, atol=0.1)
    freq = np.bincount(np.concatenate(fragile_patterns), minlength=len(PATTERNS))
    freq = freq / freq.sum()
    assert freq.argmax() == PATTERNS.index("dsm")
    assert np.allclose(freq, q[FRAGILE[0]], atol=0.02)


def test_knobs_shape_the_law():
    memory = fragile_memory()
    p_floor1, q_mix1 = make_sampler(memory, floor=1.0, mix=1.0).probabilities()
    assert np.allclose(p_floor1, 1 / N) and np.allclose(q_mix1, 1 / len(PATTERNS))
    p_sharp, _ = make_sampler(memory, floor=0.0, temperature=0.5).probabilities()
    p_flat, _ = make_sampler(memory, floor=0.0, temperature=4.0).probabilities()
    assert p_sharp[0] / p_sharp[-1] > p_flat[0] / p_flat[-1] > 1.0
    # T = 1 is the paper's formula (1/r) / sum(1/r)
    s = make_sampler(memory).scores()[0]
    inv = 1 / np.array(FRAGILE_RHO)
    assert np.allclose(s, inv / inv.sum())


def test_uniform_memory_is_plain_modality_dropout():
    """Fresh memory after warm-up: the exact keys of RandomPatternSampler (same seed), the warm-up law."""
    sampler = make_sampler(seed=5, warmup_epochs=1)
    reference = RandomPatternSampler(N, bound_policy(), seed=5)
    patterns = []
    for epoch in range(60):
        sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert not sampler.active
        keys = sampler.epoch_keys()
        assert keys == reference.epoch_keys()
        assert sorted(k[0] for k in keys) == list(range(N))
        patterns += [k[1] for k in keys]
    assert chi_square_uniform(np.array(patterns), len(PATTERNS)) < CHI2_DF6_P001


def test_uniform_relative_robustness_after_warmup_reduces_to_uniform_dropout():
    """Robustness equal across modalities (but not 1): MAS is active and still plain uniform dropout."""
    memory = RobustnessMemory(N, len(MODS))
    set_rho(memory, torch.linspace(0.5, 1.5, N)[:, None].expand(N, len(MODS)))
    sampler = make_sampler(memory, warmup_epochs=0)
    assert sampler.active
    p, q = sampler.probabilities()
    assert np.allclose(p, 1 / N) and np.allclose(q, 1 / len(PATTERNS))
    patterns = []
    for epoch in range(60):
        sampler.set_epoch(epoch)
        keys = sampler.epoch_keys()
        assert sorted(k[0] for k in keys) == list(range(N))  # every sample exactly once
        patterns += [k[1] for k in keys]
    assert chi_square_uniform(np.array(patterns), len(PATTERNS)) < CHI2_DF6_P001


def test_warm_up_follows_the_policy_then_mas_takes_over():
    sampler = make_sampler(fragile_memory(), seed=1, warmup_epochs=2)
    reference = RandomPatternSampler(N, bound_policy(), seed=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert not sampler.active and sampler.epoch_keys() == reference.epoch_keys()
    sampler.set_epoch(2)
    reference.set_epoch(2)
    assert sampler.active and sampler.epoch_keys() != reference.epoch_keys()


# the draw -------------------------------------------------------------------------------------------------
def test_draw_is_deterministic_per_seed_and_epoch():
    a = make_sampler(fragile_memory(), seed=3, warmup_epochs=0)
    b = make_sampler(fragile_memory(), seed=3, warmup_epochs=0)
    a.set_epoch(4)
    b.set_epoch(4)
    assert a.epoch_keys() == b.epoch_keys() == [(i, p) for i, p, _ in a]
    b.set_epoch(5)
    assert a.epoch_keys() != b.epoch_keys()
    c = make_sampler(fragile_memory(), seed=4, warmup_epochs=0)
    c.set_epoch(4)
    assert a.epoch_keys() != c.epoch_keys()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [60, 61])
def test_shards_are_disjoint_equal_and_cover_the_epoch(world, n):
    memory = RobustnessMemory(n, len(MODS))
    rho = torch.ones(n, len(MODS))
    rho[:10] = torch.tensor(FRAGILE_RHO)
    set_rho(memory, rho)
    sampler = make_sampler(memory, n=n, seed=2, warmup_epochs=0)
    sampler.set_epoch(7)
    keys = sampler.epoch_keys()
    shards = [sampler.shard(rank, world) for rank in range(world)]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards)
    # interleaving the shards gives back the epoch, padded by wrapping around: disjoint positions
    interleaved = [shards[pos % world][pos // world] for pos in range(per_rank * world)]
    assert interleaved == (keys + keys)[: per_rank * world]
    assert {k for s in shards for k in s} == set(keys)
    assert len(sampler) == n  # no process group: one rank
    with pytest.raises(ValueError, match="rank must lie"):
        sampler.shard(world, world)


# the memory -----------------------------------------------------------------------------------------------
def test_memory_observe_commit_by_hand():
    memory = RobustnessMemory(4, 3, momentum=0.5)
    assert memory.is_uniform() and torch.equal(memory.values, torch.ones(4, 3))
    indices = torch.tensor([0, 0, 2])  # sample 0 twice in one batch
    available = torch.tensor([[True, True, False], [True, True, True], [False, False, True]])
    # the values at missing modalities are junk on purpose: they must be ignored
    robustness = torch.tensor([[0.25, 0.75, 9.0], [0.2, 0.3, 0.5], [7.0, 7.0, 1.0]], requires_grad=True)
    memory.observe(indices, available, robustness * 1.0)
    # relative values k * r: sample 0 -> rgb (0.5 + 0.6) / 2, nir (1.5 + 0.9) / 2, dsm 1.5; sample 2 -> dsm 1.0
    assert torch.allclose(memory.counts[0], torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(memory.sums[0], torch.tensor([1.1, 2.4, 1.5], dtype=torch.float64))
    assert memory.is_uniform()  # nothing changes before commit
    stats = memory.commit()
    expected = torch.ones(4, 3)
    expected[0] = 0.5 * 1.0 + 0.5 * torch.tensor([0.55, 1.2, 1.5])
    expected[2, 2] = 1.0
    assert torch.allclose(memory.values, expected)
    assert stats["updated"] == 4 and stats["skipped"] == 0
    assert torch.allclose(stats["seen_fraction"], torch.tensor([0.25, 0.25, 0.5]))
    assert torch.allclose(stats["rho_mean"], torch.tensor([0.775, 1.1, (1.25 + 1.0) / 2]))
    assert torch.equal(memory.seen[0], torch.tensor([2, 2, 1])) and int(memory.seen[1].sum()) == 0
    assert not memory.sums.any() and not memory.counts.any()

    # an epoch without observations changes nothing; a second one chains the EMA; NaN entries are skipped
    memory.commit()
    assert torch.allclose(memory.values, expected)
    memory.observe(
        torch.tensor([0, 3]), torch.ones(2, 3, dtype=torch.bool), torch.tensor([[1.0, 0, 0], [0.5, 0.5, float("nan")]])
    )
    stats = memory.commit()
    expected[0] = 0.5 * expected[0] + 0.5 * torch.tensor([3.0, 0.0, 0.0])
    expected[3, :2] = 0.5 + 0.5 * 1.5
    assert torch.allclose(memory.values, expected)
    assert stats["skipped"] == 1 and stats["updated"] == 5


def test_memory_rejects_bad_input():
    memory = RobustnessMemory(4, 3)
    with pytest.raises(ValueError, match=r"M=3"):
        memory.observe(torch.tensor([0]), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        memory.observe(torch.tensor([4]), torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3) / 3)
    with pytest.raises(ValueError, match=r"10 samples.*has 4"):
        memory.load_state_dict(RobustnessMemory(10, 3).state_dict())
    with pytest.raises(ValueError, match=r"2 modalities.*has 3"):
        memory.load_state_dict(RobustnessMemory(4, 2).state_dict())
    with pytest.raises(ValueError, match=r"data\.mas\.momentum"):
        RobustnessMemory(4, 3, momentum=0.0)


def test_state_dict_round_trips(tmp_path: Path):
    memory = fragile_memory()
    memory.observe(torch.tensor([11, 12]), torch.ones(2, 3, dtype=torch.bool), torch.tensor([[0.6, 0.3, 0.1]] * 2))
    sampler = make_sampler(memory, seed=9, floor=0.3, mix=0.1, temperature=2.0, warmup_epochs=0)
    sampler.set_epoch(3)
    torch.save(sampler.state_dict(), tmp_path / "mas.pt")
    state = torch.load(tmp_path / "mas.pt", weights_only=True)  # checkpoint-safe: tensors and numbers only

    fresh = make_sampler(seed=9, floor=0.3, mix=0.1, temperature=2.0, warmup_epochs=0)
    fresh.load_state_dict(state)
    assert fresh.epoch == 3 and fresh.epoch_keys() == sampler.epoch_keys()
    for key in ("values", "seen", "sums", "counts"):
        assert torch.equal(fresh.memory.state_dict()[key], memory.state_dict()[key])
    # the pending observations travel too: the next commit and the next epoch agree
    memory.commit()
    fresh.memory.commit()
    assert torch.equal(fresh.memory.values, memory.values)
    sampler.set_epoch(4)
    fresh.set_epoch(4)
    assert fresh.epoch_keys() == sampler.epoch_keys()

    other = make_sampler(seed=0)  # default knobs: the checkpoint's win, with a warning naming them
    with pytest.warns(UserWarning, match=r"seed=9.*data\.mas\.floor=0\.3.*data\.mas\.warmup_epochs=0"):
        other.load_state_dict(state)
    assert (other.seed, other.floor, other.mix, other.temperature, other.warmup_epochs) == (9, 0.3, 0.1, 2.0, 0)
    with pytest.raises(ValueError, match=r"60 samples.*has 30"):
        make_sampler(n=30).load_state_dict(state)


def test_knob_validation_names_the_config_key():
    for kwargs, key in [
        ({"floor": -0.1}, "floor"),
        ({"floor": 1.5}, "floor"),
        ({"mix": 2.0}, "mix"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"warmup_epochs": 1.5}, "warmup_epochs"),
    ]:
        with pytest.raises(ValueError, match=rf"data\.mas\.{key}"):
            make_sampler(**kwargs)
    with pytest.raises(ValueError, match="bind"):
        MASSampler(N, UniformPatterns(), RobustnessMemory(N, 3))
    with pytest.raises(ValueError, match=r"holds 10 samples.*has 60"):
        MASSampler(N, bound_policy(), RobustnessMemory(10, 3))
    with pytest.raises(ValueError, match=r"holds 2 modalities"):
        MASSampler(N, bound_policy(), RobustnessMemory(N, 2))


# DDP: a real 2-process gloo commit ------------------------------------------------------------------------
DDP_BATCHES = {  # rank -> (indices, available, robustness); sample 1 is seen on both ranks
    0: ([0, 1], [[1, 1, 1], [1, 1, 1]], [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]),
    1: ([1, 2], [[1, 0, 1], [1, 1, 1]], [[0.5, 0.0, 0.5], [1 / 3, 1 / 3, 1 / 3]]),
}
DDP_N = 7


def _ddp_worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=2)
    try:
        memory = RobustnessMemory(DDP_N, 3, momentum=0.5)
        indices, available, robustness = DDP_BATCHES[rank]
        memory.observe(torch.tensor(indices), torch.tensor(available, dtype=torch.bool), torch.tensor(robustness))
        memory.commit(all_reduce=lambda t: (dist.all_reduce(t), t)[1])
        sampler = MASSampler(DDP_N, bound_policy(), memory, seed=0, warmup_epochs=0)
        sampler.set_epoch(1)
        keys = list(sampler)  # shards through the live process group
        torch.save(
            {"values": memory.values, "seen": memory.seen, "keys": torch.tensor(keys), "len": len(sampler)},
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_commit_sums_across_two_gloo_ranks(tmp_path: Path):
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    expected = torch.ones(DDP_N, 3)
    expected[0] = 0.5 + 0.5 * torch.tensor([1.5, 0.75, 0.75])
    expected[1] = 0.5 + 0.5 * torch.tensor([(0.6 + 1.0) / 2, 0.6, (1.8 + 1.0) / 2])  # both ranks' passes
    for result in results:
        assert torch.allclose(result["values"], expected)
        assert torch.equal(result["seen"][:3], torch.tensor([[1, 1, 1], [2, 1, 2], [1, 1, 1]]))
    assert torch.equal(results[0]["values"], results[1]["values"])

    # the same memory on one process gives the same sampler: the ranks' shards split its epoch
    memory = RobustnessMemory(DDP_N, 3, momentum=0.5)
    for indices, available, robustness in DDP_BATCHES.values():
        memory.observe(torch.tensor(indices), torch.tensor(available, dtype=torch.bool), torch.tensor(robustness))
    memory.commit()
    assert torch.allclose(memory.values, expected)
    sampler = MASSampler(DDP_N, bound_policy(), memory, seed=0, warmup_epochs=0)
    sampler.set_epoch(1)
    assert results[0]["len"] == results[1]["len"] == 4
    for rank, result in enumerate(results):
        assert [(i, p, 1) for i, p in sampler.shard(rank, 2)] == [tuple(k) for k in result["keys"].tolist()]


def test_mas_reweights_only_within_the_policy_support():
    """missing=rgb+dsm (or a pattern subset) stays in force after warm-up: MAS never adds excluded patterns."""
    from sgma.data.missing import FixedPattern, UniformPatterns

    for policy, allowed in (
        (FixedPattern("rgb+dsm"), {"rgb+dsm"}),
        (UniformPatterns(["rgb", "dsm+nir"]), {"rgb", "nir+dsm"}),
    ):
        policy.bind(("rgb", "nir", "dsm"))
        memory = RobustnessMemory(6, 3)
        memory.observe(torch.arange(6), torch.ones(6, 3, dtype=torch.bool), torch.tensor([[0.6, 0.3, 0.1]] * 6))
        memory.commit()
        sampler = MASSampler(6, policy, memory, seed=0, warmup_epochs=0)
        assert sampler.active
        _, q = sampler.probabilities()
        names = [policy.patterns[j] for j in np.flatnonzero(q.sum(axis=0) > 0)]
        assert set(names) == allowed
        drawn = {
            policy.patterns[pid] for epoch in range(5) for _, pid in (sampler.set_epoch(epoch) or sampler.epoch_keys())
        }
        assert drawn == allowed


def test_mas_reweights_the_policy_law_so_missing_p_keeps_its_effect():
    """missing=bernoulli missing.p=... after warm-up: MAS tilts the policy's law towards the fragile modality
    (was: uniform over the policy's support, whatever p). Uniform robustness gives the policy's law itself."""
    from sgma.data.missing import BernoulliDropout

    present = {}
    for p in (0.1, 0.9):
        policy = BernoulliDropout(p)
        policy.bind(("rgb", "nir", "dsm"))
        memory = RobustnessMemory(300, 3)
        memory.observe(
            torch.arange(300), torch.ones(300, 3, dtype=torch.bool), torch.tensor([[0.34, 0.33, 0.33]] * 300)
        )
        memory.commit()
        sampler = MASSampler(300, policy, memory, seed=0, warmup_epochs=1)
        # warm-up: the epoch draws from the policy, and that is the law reported
        _, q_warm = sampler.epoch_law()
        assert np.allclose(q_warm, policy.law())
        sampler.set_epoch(1)
        assert sampler.active
        _, q = sampler.probabilities()
        assert np.allclose(q, policy.law(), atol=0.01)  # nearly uniform robustness: nearly the policy's law
        present[p] = sampler.modality_probabilities()
        drawn = np.array(
            [sampler.masks[pid] for e in range(1, 6) for _, pid in (sampler.set_epoch(e) or sampler.epoch_keys())]
        )
        assert np.allclose(drawn.mean(axis=0), present[p], atol=0.03)
    # each modality present with P(kept | at least one kept): 0.9 / (1 - 0.1^3) and 0.1 / (1 - 0.9^3)
    assert np.allclose(present[0.1], 0.9 / (1 - 0.1**3), atol=0.01)
    assert np.allclose(present[0.9], 0.1 / (1 - 0.9**3), atol=0.01)
