"""The MAS branch in the LightningModule and the MAS sampler wired into training (resume, DDP)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from conftest import REPO, batch_of, bind_to, compose_config
from sgma.data.mas import MASSampler
from sgma.tasks import build_datamodule, build_module, train


def _module(tmp_path: Path, *overrides: str):
    cfg = bind_to(compose_config("train", ["debug=tiny", "logger=csv", "model=sgma", *overrides]), tmp_path)
    with open_dict(cfg):
        cfg.model.dropout = 0.0  # deterministic logits for the loss check
    dm = build_datamodule(cfg)
    return cfg, dm, build_module(cfg, dm)


class CountHead:
    def __init__(self, module):
        self.calls = 0
        module.net.head.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_branch_runs_in_training_only(tmp_path):
    _, dm, module = _module(tmp_path)
    counter = CountHead(module)
    batch = batch_of(dm, [6, 3, 1, 0])
    module.train()
    module.training_step(batch, 0)
    assert counter.calls == 2  # fused prediction + the MAS branch
    module.eval()
    with torch.no_grad():
        module(batch)
        module.confusion["val"].update(module(batch).logits.argmax(1), batch["mask"], batch["pattern"])
    assert counter.calls == 4  # eval: one head pass per forward, never the branch


@pytest.mark.parametrize("draw", ["batch", "sample"])
def test_loss_combines_both_branches_with_the_weights(tmp_path, draw):
    _, dm, module = _module(tmp_path, f"mas.draw={draw}", "mas.lambda_main=2.0", "mas.lambda_mas=0.5")
    module.eval()  # MiT's stochastic depth would make the two passes differ; the arithmetic is the point
    # one modality per sample: the drawn modality is the only one, so the branch equals the fused prediction
    rgb_only = dm.patterns.index("rgb")
    batch = batch_of(dm, [rgb_only] * 4)
    torch.manual_seed(0)
    with torch.no_grad():
        loss = module.training_step(batch, 0)["loss"]
        inputs = {n: batch[n] for n in module.modality_names}
        ce = F.cross_entropy(module.net(inputs, batch["available"]).logits, batch["mask"], ignore_index=255)
    assert float(loss) == pytest.approx(2.5 * float(ce), rel=1e-5)


def test_branch_reuses_the_main_pass_and_weights_out_samples_without_the_drawn_modality(tmp_path):
    """The MAS branch fuses the main pass's SGF tokens (the projectors run once per scale), and with
    mas.draw=batch it decodes the whole batch, with loss weight 0 for the samples that lack the drawn
    modality: the loss equals the cross-entropy over the samples that have it."""
    _, dm, module = _module(tmp_path, "mas.draw=batch")
    module.eval()  # deterministic passes (no stochastic depth), so the reference below is exact
    calls = []
    for fusion in module.net.fusion:
        fusion.projectors.register_forward_hook(lambda *_: calls.append(1))
    ids = [dm.patterns.index(p) for p in ("rgb+nir", "rgb", "rgb+dsm", "rgb")]
    batch = batch_of(dm, ids)
    with torch.no_grad():
        loss = float(module.training_step(batch, 0)["loss"])
    assert len(calls) == len(module.net.fusion)  # one projector pass per scale, shared by both branches
    inputs, available, mask = {n: batch[n] for n in module.modality_names}, batch["available"], batch["mask"]
    with torch.no_grad():
        main = F.cross_entropy(module.net(inputs, available).logits, mask, ignore_index=255)
        candidates = []
        for m in range(available.shape[1]):  # whichever modality was drawn
            rows = available[:, m]
            alone = torch.zeros_like(available[rows])
            alone[:, m] = True
            logits = module.net({k: v[rows] for k, v in inputs.items()}, alone).logits
            candidates.append(2.0 * float(main) + float(F.cross_entropy(logits, mask[rows], ignore_index=255)))
    assert any(loss == pytest.approx(c, rel=1e-5) for c in candidates), (loss, candidates)


def test_branch_batch_norm_sees_only_samples_with_the_drawn_modality(tmp_path):
    """mas.draw=batch decodes the whole batch; the rows that lack the drawn modality are copies of rows that have
    it, so the head's BatchNorm batch statistics and running averages come from real features only (they held
    the fusion of a missing slot's placeholder)."""
    _, dm, module = _module(tmp_path, "mas.draw=batch")
    norm = next(m for m in module.net.head.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    norm.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    ids = [dm.patterns.index(p) for p in ("rgb", "rgb", "nir", "dsm", "rgb+dsm")]
    batch = batch_of(dm, ids)
    module.train()
    for step in range(4):  # several draws
        seen.clear()
        with torch.no_grad():
            module.training_step(batch, step)
        branch = seen[1]  # the main pass, then the MAS branch
        available = batch["available"]
        copies = [
            m
            for m in range(available.shape[1])
            if all(any(torch.equal(branch[i], branch[j]) for j in available[:, m].nonzero()[:, 0]) for i in range(5))
        ]
        assert copies, "a row that lacks the drawn modality is not a copy of one that has it"


def test_branch_off_is_plain_cross_entropy(tmp_path):
    _, dm, module = _module(tmp_path, "mas.branch=false", "mas.lambda_main=1.0")
    counter = CountHead(module)
    batch = batch_of(dm, [6, 6])
    module.eval()
    with torch.no_grad():
        loss = module.training_step(batch, 0)["loss"]
        inputs = {n: batch[n] for n in module.modality_names}
        ce = F.cross_entropy(module.net(inputs, batch["available"]).logits, batch["mask"], ignore_index=255)
    assert counter.calls == 2  # the training step's single head pass + our reference pass
    assert float(loss) == pytest.approx(float(ce), rel=1e-6)


def test_loss_based_fragility_for_mean_fusion(tmp_path):
    _, dm, module = _module(tmp_path, "model=mas_only")
    assert module.net.fusion[0].__class__.__name__ == "MeanFusion"
    before = module.mas_loss_ema.clone()
    module.train()
    module.training_step(batch_of(dm, [6, 6, 6, 6]), 0)
    assert not torch.equal(before, module.mas_loss_ema)  # the drawn modality's loss EMA moved


def test_robustness_memory_survives_resume(tmp_path):
    first = tmp_path / "first"
    cfg = bind_to(compose_config("train", ["debug=tiny", "logger=csv", "model=sgma", "test=false"]), first)
    _, objects = train(cfg)
    sampler = objects["datamodule"].train_sampler
    assert isinstance(sampler, MASSampler)
    seen_after_one = sampler.memory.seen.clone()
    assert seen_after_one.sum() > 0
    ckpt = first / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    stored = state["MultiModalDataModule"]["sampler_state"]
    assert torch.equal(torch.as_tensor(stored["memory"]["values"]), sampler.memory.values)

    second = tmp_path / "second"
    cfg2 = bind_to(
        compose_config(
            "train",
            ["debug=tiny", "logger=csv", "model=sgma", "test=false", f"ckpt_path={ckpt}", "trainer.max_epochs=2"],
        ),
        second,
    )
    _, objects2 = train(cfg2)
    resumed = objects2["datamodule"].train_sampler
    # the resumed run continued from the stored memory: its counts include the first run's epoch
    assert (resumed.memory.seen >= seen_after_one).all() and resumed.memory.seen.sum() > seen_after_one.sum()
    assert resumed.epoch == 1


def _train_one_step_on_rank(rank: int, world: int, tmp_path: Path) -> None:
    """A rank of a real gloo process group: one mas_only training step on this rank's own batch, then the epoch
    means; saves what the parent test compares."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=rank, world_size=world
    )
    try:
        _, dm, module = _module(tmp_path / f"rank{rank}", "model=mas_only")
        module.train()
        torch.manual_seed(rank)  # different draws on each rank, of different samples and patterns
        batch = {k: v[rank * 4 : rank * 4 + 4] for k, v in batch_of(dm, [6, 6, 6, 6, 3, 5, 0, 6]).items()}
        module.training_step(batch, 0)
        sums = {name: [t.clone() for t in pair] for name, pair in module._epoch_sums.items()}
        torch.save({"ema": module.mas_loss_ema.clone(), "sums": sums, "means": module._epoch_means()},
                   tmp_path / f"rank{rank}.pt")  # fmt: skip
        if (
            rank == 1
        ):  # a step that diverges on one rank only: every rank must stop (a lone one left the others waiting)
            batch = {k: torch.full_like(v, float("nan")) if k in module.modality_names else v for k, v in batch.items()}
        module.training_step(batch, 1)
        try:
            module._check_finite()
            stopped = "did not stop"
        except FloatingPointError as err:
            stopped = str(err)
        (tmp_path / f"rank{rank}.txt").write_text(stopped)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_pool_the_loss_fragility_and_the_epoch_means(tmp_path):
    """Under DDP every rank's samples count: the loss-based fragility EMA (model=mas_only) is updated from all
    ranks' losses, so the ranks agree (DDP used to broadcast rank 0's EMA, which had seen rank 0's samples only),
    and the epoch means of the losses and MAS draws pool the ranks' sums (they were rank 0's). A loss that is not
    finite on one rank stops every rank."""
    torch.multiprocessing.spawn(_train_one_step_on_rank, args=(2, tmp_path), nprocs=2)
    assert (tmp_path / "rank1.txt").read_text().startswith("training loss is nan at step 0")
    assert "training loss is not finite on another DDP rank" in (tmp_path / "rank0.txt").read_text()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert torch.equal(ranks[0]["ema"], ranks[1]["ema"])
    assert not torch.equal(ranks[0]["ema"], torch.ones_like(ranks[0]["ema"]))  # it did move
    assert ranks[0]["means"] == ranks[1]["means"]
    for name, key in (("losses", "train/loss_main"), ("mas_drawn", "train/mas/drawn_rgb")):
        column = 0  # loss_main / rgb
        total = sum(float(r["sums"][name][0][column]) for r in ranks)
        count = sum(float(r["sums"][name][1]) for r in ranks)
        assert ranks[0]["means"][key] == pytest.approx(total / count)
        alone = float(ranks[0]["sums"][name][0][column]) / float(ranks[0]["sums"][name][1])
        assert ranks[0]["means"][key] != pytest.approx(alone)  # rank 0's own mean differs from the pooled one


def test_ddp_two_processes_with_mas_sampler(tmp_path):
    """A real 2-process DDP run on CPU (gloo): one epoch with the MAS sampler, memory synced across ranks."""
    env = {**os.environ, "WANDB_MODE": "offline", "SGMA_LOG_DIR": str(tmp_path)}
    args = [
        "debug=tiny",
        "model=sgma",
        "trainer=ddp_cpu",
        "logger=csv",
        "trainer.max_epochs=1",
        "dataset.splits.train.num_samples=16",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    assert (run / "patterns.csv").is_file()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    memory = state["MultiModalDataModule"]["sampler_state"]["memory"]
    seen = torch.as_tensor(memory["seen"])
    # 16 samples, 2 ranks x 2 batches of 4: each rank sees 8 samples, and rank 0's checkpoint holds all 16
    # only because the ranks' observations were all-reduced into one memory
    assert int((seen.sum(dim=1) > 0).sum()) == 16
    # the rank-pooled epoch means are logged, and Lightning's sync_dist hint (once per metric name) is left only
    # for the one value that is rank 0's (every evaluation metric and MAS mean is equal on every rank)
    header = next((run / "csv").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/loss_main", "train/loss_mas", "train/mas/drawn_rgb", "train/robustness/s1/rgb"} <= set(header)
    hinted = set(re.findall(r"It is recommended to use `self\.log\('([^']*)'", proc.stderr))
    assert hinted <= {"train/loss"}, hinted


def test_ddp_small_shares_train_and_too_few_eval_pairs_are_refused(tmp_path):
    """2 processes: 6 training samples give each rank 3, under one batch of 4, which train as one short batch (was:
    every batch dropped, "total_steps must be >= 1"); scoring 1 (sample, pattern) pair on 2 processes is refused
    with the fix (was: the empty rank failed in Lightning and the other died waiting)."""
    env = {**os.environ, "WANDB_MODE": "offline", "SGMA_LOG_DIR": str(tmp_path)}
    run = tmp_path / "run"
    args = [
        "debug=tiny",
        "trainer=ddp_cpu",
        "logger=csv",
        "test=false",
        "dataset.splits.train.num_samples=6",
        "model=mas_only",
    ]  # its loss-based fragility all-reduces every step: that must not hang DDP
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 1
    args = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.devices=2", "trainer.accelerator=cpu",
            "dataset=synthetic", "dataset.size=64", "dataset.splits.test.num_samples=1", "patterns=[rgb]",
            f"hydra.run.dir={tmp_path / 'eval'}"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode != 0 and "1 (sample, pattern) pair(s) to score" in proc.stderr, proc.stderr[-4000:]
    assert "trainer.devices=1 (x trainer.num_nodes) or fewer" in proc.stderr
