"""Step benchmark: what a training step and an inference pass cost per preset, against the baseline.

Answers "is SGF + MAS close to the baseline's cost, and does the step keep the device busy?" (issue #10). For
every (backbone, crop x batch) it builds each preset the way ``train.py`` does (Hydra compose of ``conf/``
with ``model=<preset>``, ``backbone.name=...``, ``backbone.pretrained=false``, random init, nothing
downloaded) on the synthetic dataset's 3 modalities, and measures on random inputs whose modality patterns
are drawn uniformly per sample (the same batches for every preset):

- **train**: ``SegmentationModule.training_step`` + backward + optimizer step (AdamW as configured,
  ``optimizer.fused`` included), under autocast for ``--precision bf16`` as Lightning's ``bf16-mixed`` does.
  No Trainer is attached, so Lightning's own logging work is not in the figures.
- **infer**: ``model.eval()`` + ``torch.inference_mode()``, one forward with every modality available.

Per phase and preset:

- ``ms``: median wall time per step over ``--iters`` steps after ``--warmup`` (CUDA: CUDA events, the step
  ends with a synchronize; CPU: ``perf_counter``).
- ``host ms``: CUDA: median time the host needs to queue the step (``perf_counter`` from the start until the
  last call returns, before synchronizing); CPU: process CPU time (all threads, ``time.process_time``).
- ``device ms`` (CUDA only): GPU busy time of one profiled step, the sum of its kernels' device time
  (``torch.profiler``). Host ms above device ms means the GPU waits for the host.
- ``peak MB``: extra memory one step needs above what was allocated before it, measured in one more step
  after the timed ones. CUDA: ``max_memory_allocated``; CPU: the resident-set high-water mark (``VmHWM``
  after resetting it through ``/proc/self/clear_refs``) minus ``VmRSS`` before the step; for that step glibc
  first returns the heap's free pages to the OS (``malloc_trim``) and gives every new buffer of 128 KiB or
  more its own mapping (``mallopt``), so that memory freed before the step does not hide its peak; ``-``
  where the kernel or the C library does not offer this. CPU timings run with glibc's mmap threshold fixed
  at 32 MiB, the value its dynamic threshold settles at in a training loop (the 128 KiB setting would slow a
  step about 2x with page faults, so it is never on while timing).
- ``syncs``: host-device synchronisations in one step. CUDA: warnings of ``torch.cuda.set_sync_debug_mode``.
  CPU (no device to wait for): dispatched ops that would synchronise on a GPU (``_local_scalar_dense``,
  i.e. ``.item()``/``bool()``/``int()`` of a tensor; ``nonzero``; ``multinomial``; ``masked_select``;
  ``unique``; indexing with a boolean mask), counted with a ``TorchDispatchMode``. Train counts cover
  training_step + backward + optimizer step.
- ``ops``: aten ops dispatched in one step (``TorchDispatchMode`` counter; train: training_step + backward,
  the optimizer step is reported apart as ``opt ops``). Works on any device.
- ``GFLOP``: floating-point operations of one step in 1e9 (train: training_step + backward, not the optimizer;
  infer: the forward), from torch's ``FlopCounterMode`` with grouped convolutions' backward counted right
  (:func:`sgma.opcount.flop_counter`). Counts matmuls and convolutions, not elementwise work; the same on every
  device, so it says what a ratio would be if every kernel ran at the same efficiency.
- ``GB moved``: memory traffic of the same passes run op by op (1e9 bytes): every op that is not a view reads its
  tensor inputs and writes its new outputs (``OpCounter.bytes``). An estimate for eager execution (caches and fused
  kernels move less), in the step's own dtypes (``--precision bf16`` halves most of it); with ``GFLOP`` and ``ops``
  it says whether a preset costs more arithmetic, more memory passes or more kernels.
- ``warm-up s``: wall time of the warm-up steps; with ``--compile`` it starts with one step per packed batch
  shape the timed steps use (:meth:`~sgma.models.segmentor.MultiModalSegmentor.plan_encoding`), so it holds
  the compile time and no timed step compiles. Under ``--compile`` ``ops`` are not counted (a dispatch mode
  makes dynamo fall back to eager), nor FLOPs and traffic, only CUDA syncs.
- ``step_ms`` and ``new_shape`` (JSON; summed up on the ``# done:`` line): every timed step's wall time, and
  whether its packed encoder batch (the available slots, 8 to 24 for 3 modalities x 8 samples) had a size not met
  before in the phase. Eager mode runs each size as a new shape, and a GPU library may set kernels up per shape
  (e.g. cuDNN execution plans): a training run pays that once per size, so it shows up as slow new-size steps.
- ``x``: the ratio to the baseline preset of the same backbone and size, in the same run.
- ``other load`` (CPU runs): cores used by other processes during the timed steps (``/proc/stat``); on a
  shared machine, rows with a high value have unreliable times. Ops and syncs do not depend on it.

``--profile N`` profiles one more step per phase and prints the N ops with the most self time (device time on
CUDA, CPU time on CPU) with their input shapes, which says where a ratio comes from; ``--trace DIR`` writes that
step's Chrome trace (open it in ``chrome://tracing`` or Perfetto). Both are kept in the JSON.

The train table's ``syncs`` column reads ``<in training_step>/<in the whole step>``.

Usage::

    .venv/bin/python scripts/bench_step.py --device cpu --size 64 --batch 4 --backbones mit_b0   # CPU, quick
    python scripts/bench_step.py --device cuda --precision bf16                                 # the GPU table
    python scripts/bench_step.py --device cuda --precision bf16 --compile --backbones tu-pvt_v2_b2
    python scripts/bench_step.py --device cuda --precision bf16 --shapes 512x8 --profile 25 --trace traces/
    .venv/bin/python scripts/bench_step.py --counts-only --size 64 --batch 4 --backbones mit_b0 --out x.json

Imports nothing beyond torch, lightning, hydra/omegaconf and the model's own dependencies (no wandb), so it
runs on a bare GPU machine with ``PYTHONPATH=src:<copied site-packages>``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sgma.opcount import OpCounter, flop_counter

PRESETS = ("baseline", "sgf_only", "sgma")
BACKBONES = ("mit_b0", "tu-pvt_v2_b2")
SHAPES = ((512, 8), (1024, 2))


@contextlib.contextmanager
def cuda_sync_warnings(device: torch.device) -> Iterator[list]:
    """Record the warnings of ``torch.cuda.set_sync_debug_mode('warn')`` (one per synchronising call)."""
    records: list = []
    if device.type != "cuda":
        yield records
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield records
        finally:
            torch.cuda.set_sync_debug_mode(0)
    records.extend(w for w in caught if "synchroniz" in str(w.message).lower())


# memory ------------------------------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _busy_seconds() -> float | None:
    """CPU seconds all cores spent busy so far (``/proc/stat``; steal time counts as busy)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores used by everything but this process while active (a shared CPU box makes timings unreliable)."""

    def __enter__(self) -> OtherLoad:
        self.busy, self.own, self.wall = _busy_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = _busy_seconds()
        wall = time.perf_counter() - self.wall
        if busy is None or self.busy is None or wall <= 0:
            self.value = None
        else:
            self.value = max(0.0, (busy - self.busy) - (time.process_time() - self.own)) / wall


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
SETTLED_MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where its dynamic one settles
PEAK_MMAP_THRESHOLD = 128 * 2**10


def _glibc(name: str, *args: int) -> int | None:
    """A glibc malloc-tuning call (``mallopt``, ``malloc_trim``); None where the C library has no such function."""
    try:
        return getattr(ctypes.CDLL(None), name)(*args)
    except (OSError, AttributeError):
        return None


def _set_mmap_threshold(nbytes: int) -> bool:
    return _glibc("mallopt", M_MMAP_THRESHOLD, nbytes) == 1


def _release_free_heap() -> bool:
    """``malloc_trim(0)``: give the free pages of the heap back to the OS, so that a step that reuses them shows in
    the resident set again (a lower mmap threshold alone only affects new heap growth)."""
    return _glibc("malloc_trim", 0) is not None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Extra memory of one step above what was allocated before it, in MB (None where not measurable)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.value: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            gc.collect()
            self.ok = _set_mmap_threshold(PEAK_MMAP_THRESHOLD) and _release_free_heap() and _reset_rss_peak()
            self.before = _proc_status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.value = (torch.cuda.max_memory_allocated() - self.before) / 2**20
        else:
            peak = _proc_status_kb("VmHWM")
            _set_mmap_threshold(SETTLED_MMAP_THRESHOLD)
            if self.ok and self.before is not None and peak is not None:
                self.value = max(0, peak - self.before) / 1024


# the model and the batches -------------------------------------------------------------------------------------
def build(preset: str, backbone: str, size: int, batch: int, args: argparse.Namespace):
    """The LightningModule of ``preset`` as train.py builds it, and its optimizer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sgma.config import CONFIG_DIR, register_configs
    from sgma.tasks import build_datamodule, build_module

    overrides = [
        f"model={preset}",
        f"backbone.name={backbone}",
        "backbone.pretrained=false",
        f"dataset.size={size}",
        f"data.batch_size={batch}",
        *args.override,
    ]
    # only when asked: a checkout from before these options (for before/after comparisons) lacks the keys
    if args.compile:
        overrides.append("model.compile=true")
    if args.compile_backend:
        overrides.append(f"++model.compile_options.backend={args.compile_backend}")
    if args.channels_last:
        overrides.append("model.channels_last=true")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm).to(args.device)
    optimizer = module.optimizer_factory(params=module.parameters())
    return module, optimizer, dm


def make_batches(dm, size: int, batch: int, count: int, device: torch.device, module) -> list[dict]:
    """``count`` random batches, patterns uniform over the non-empty ones per sample, moved to ``device``
    after the module's host-side preparation (as Lightning does)."""
    g = torch.Generator().manual_seed(1234)
    modalities = dm.modalities
    masks = dm.dataset("train").masks  # (P, M) bool
    batches = []
    for _ in range(count):
        pattern = torch.randint(len(masks), (batch,), generator=g)
        available = masks[pattern]
        sample = {}
        for i, m in enumerate(modalities):
            x = torch.randn(batch, m.channels, size, size, generator=g)
            sample[m.name] = x * available[:, i].view(-1, 1, 1, 1)  # missing: zeros, as the dataset does
        sample["mask"] = torch.randint(dm.num_classes, (batch, size, size), generator=g)
        sample["available"] = available
        sample["pattern"] = pattern
        sample["index"] = torch.arange(batch)
        sample = module.on_before_batch_transfer(sample, 0)
        batches.append({k: v.to(device, non_blocking=True) for k, v in sample.items()})
    return batches


def full_batch(batch: dict, module) -> dict:
    """The same inputs with every modality available (inference phase)."""
    out = {k: v.clone() for k, v in batch.items() if k != "encode_index"}
    out["available"] = torch.ones_like(out["available"])
    cpu = {k: v.cpu() for k, v in out.items()}
    return {k: v.to(batch["available"].device) for k, v in module.on_before_batch_transfer(cpu, 0).items()}


# timing ------------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    ms: float = float("nan")
    host_ms: float = float("nan")
    device_ms: float | None = None
    peak_mb: float | None = None
    syncs: int = 0
    sync_ops: dict = field(default_factory=dict)
    other_load: float | None = None  # CPU runs: cores used by other processes during the timed steps
    ops: int = 0  # forward + backward
    opt_ops: int = 0  # optimizer step
    step_ops: int = 0  # forward alone (training_step for train)
    gflops: float | None = None  # floating-point operations of forward + backward (not the optimizer), 1e9
    traffic_gb: float | None = None  # memory traffic of forward + backward run op by op, 1e9 bytes
    step_syncs: int = 0
    warmup_s: float = float("nan")  # the warm-up steps (with --compile: compiling every packed shape first)
    step_ms: list = field(default_factory=list)  # every timed step's wall time, in order
    new_shape: list = field(default_factory=list)  # per timed step: its packed encoder batch size was new
    top_ops: list = field(default_factory=list)  # --profile N: the N ops with the most self time in one step


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Step:
    """One phase's step in three parts, so the counters can tell them apart: ``forward`` (training_step or
    the inference forward), ``backward`` and ``update`` (the optimizer step)."""

    name: str  # the phase, as in the tables and the JSON

    def forward(self, batch: dict):
        raise NotImplementedError

    def backward(self, state) -> None:
        pass

    def update(self) -> None:
        pass

    def __call__(self, batch: dict) -> None:
        self.backward(self.forward(batch))
        self.update()


class TrainStep(Step):
    name = "train"

    def __init__(self, module, optimizer, device: torch.device, precision: str) -> None:
        self.module, self.optimizer, self.device, self.precision = module.train(), optimizer, device, precision

    def forward(self, batch: dict):
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            return self.module.training_step(batch, 0)["loss"]

    def backward(self, loss) -> None:
        loss.backward()

    def update(self) -> None:
        self.optimizer.step()


class InferStep(Step):
    name = "infer"

    def __init__(self, module, device: torch.device, precision: str) -> None:
        self.module, self.device, self.precision = module.eval(), device, precision

    def forward(self, batch: dict):
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.module(batch)


def measure(step: Step, batches: list[dict], device: torch.device, args: argparse.Namespace, case: str) -> Phase:
    phase = Phase()
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    if args.compile:  # compile every packed shape the timed steps will meet before timing anything
        shapes = {}
        for batch in batches:
            shapes.setdefault(tuple(batch["encode_index"].shape), batch)
        for batch in shapes.values():
            step(batch)
    for batch in batches[: args.warmup]:
        step(batch)
    if cuda:
        torch.cuda.synchronize()
    phase.warmup_s = time.perf_counter() - t0
    timed = batches[args.warmup : args.warmup + args.iters]
    if not args.counts_only:
        # sizes met before the timed steps (under --compile every size was compiled in the warm-up)
        seen = {packed_size(b) for b in (batches if args.compile else batches[: args.warmup])}
        for batch in timed:
            phase.new_shape.append(packed_size(batch) not in seen)
            seen.add(packed_size(batch))
        walls, hosts = [], []
        load = OtherLoad().__enter__()
        for batch in timed:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                start.record()
                step(batch)
                end.record()
                hosts.append((time.perf_counter() - t0) * 1e3)
                end.synchronize()
                walls.append(start.elapsed_time(end))
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                step(batch)
                walls.append((time.perf_counter() - t0) * 1e3)
                hosts.append((time.process_time() - c0) * 1e3)
        load.__exit__()
        phase.ms, phase.host_ms = statistics.median(walls), statistics.median(hosts)
        phase.step_ms = walls
        phase.other_load = None if cuda else load.value
        if cuda or args.profile or args.trace:
            trace = args.trace / f"{case}-{step.name}.json" if args.trace else None
            phase.device_ms, phase.top_ops = profile_step(step, timed[0], device, top=args.profile, trace=trace)
        with PeakMemory(device) as peak:
            step(timed[0])
        phase.peak_mb = peak.value
    # counts: one more step under the counters (slow, not timed), each part on its own
    counters, cuda_syncs = [], []
    state = timed[0]
    for part in (step.forward, step.backward, lambda _: step.update()):
        # a dispatch mode makes dynamo skip the compiled frames: under --compile only CUDA syncs are counted
        counter = OpCounter()
        with cuda_sync_warnings(device) as sync_warnings, contextlib.nullcontext() if args.compile else counter:
            state = part(state)
        if cuda:
            torch.cuda.synchronize()
        counters.append(counter)
        cuda_syncs.append(len(sync_warnings))
    fwd, bwd, upd = counters
    phase.ops, phase.opt_ops, phase.step_ops = fwd.total + bwd.total, upd.total, fwd.total
    phase.traffic_gb = (fwd.bytes + bwd.bytes) / 1e9
    # FLOPs of forward and backward (not the optimizer's arithmetic), in a pass of their own: torch's FLOP counter
    # decomposes the composite ops that inference mode dispatches whole, which would change what OpCounter sees
    if not args.compile:
        with flop_counter() as flops:
            step.backward(step.forward(timed[0]))
        phase.gflops = flops.get_total_flops() / 1e9
    if args.compile:
        phase.ops = phase.opt_ops = phase.step_ops = phase.gflops = phase.traffic_gb = None
    counted = [sum(c.syncs.values()) for c in counters]
    phase.syncs = sum(cuda_syncs) if cuda else sum(counted)
    phase.step_syncs = cuda_syncs[0] if cuda else counted[0]
    phase.sync_ops = dict(fwd.syncs + bwd.syncs + upd.syncs)
    return phase


def packed_size(batch: dict) -> int:
    """How many (sample, modality) slots the shared encoder runs on for this batch (its input's batch size)."""
    return int(batch["encode_index"].shape[-1]) if "encode_index" in batch else -1


def new_shape_cost(phase: Phase) -> str | None:
    """Timed steps whose packed encoder batch size the phase met for the first time against the others (medians):
    in eager mode a GPU library may set up kernels per new shape (e.g. cuDNN execution plans), which a training
    run pays once per size."""
    new = [ms for ms, is_new in zip(phase.step_ms, phase.new_shape, strict=True) if is_new]
    old = [ms for ms, is_new in zip(phase.step_ms, phase.new_shape, strict=True) if not is_new]
    if not new or not old:
        return None
    return f"{len(new)} steps at a new packed size {statistics.median(new):.1f} ms vs {statistics.median(old):.1f} ms"


def profile_step(
    step: Step, batch: dict, device: torch.device, *, top: int, trace: Path | None
) -> tuple[float | None, list]:
    """One step under ``torch.profiler``: the GPU busy time (the sum of its kernels' device time; None on CPU) and
    the ``top`` ops with the most self time (device time on CUDA, CPU time on CPU), grouped by op and input
    shapes. ``trace``: also write the step's Chrome trace to that file."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=top > 0) as prof:
        step(batch)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages(group_by_input_shape=top > 0)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))

    def self_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    device_ms = sum(e.self_device_time_total for e in events) / 1e3 if cuda else None
    ranked = sorted((e for e in events if self_us(e) > 0), key=self_us, reverse=True)[:top]
    return device_ms, [
        {"op": e.key, "shapes": str(e.input_shapes), "calls": e.count, "self_ms": self_us(e) / 1e3} for e in ranked
    ]


def print_top_ops(title: str, phase: Phase) -> None:
    total = sum(op["self_ms"] for op in phase.top_ops)
    print(f"# top {len(phase.top_ops)} ops of one step, {title} ({total:.1f} ms of self time):", file=sys.stderr)
    for op in phase.top_ops:
        print(f"#   {op['self_ms']:8.2f} ms {op['calls']:5d} x {op['op']} {op['shapes'][:160]}", file=sys.stderr)


# the run -------------------------------------------------------------------------------------------------------
def run_case(preset: str, backbone: str, size: int, batch: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    module, optimizer, dm = build(preset, backbone, size, batch, args)
    batches = make_batches(dm, size, batch, args.warmup + max(args.iters, 1), device, module)
    result = {"preset": preset, "backbone": backbone, "size": size, "batch": batch}
    case = f"{backbone}-{size}x{batch}-{preset}"
    if "train" in args.phases:
        result["train"] = measure(TrainStep(module, optimizer, device, args.precision), batches, device, args, case)
        if hasattr(module, "_check_finite"):  # (a checkout from before the guard has none)
            module._check_finite()  # a diverging random-init step would make the figures meaningless
    if "infer" in args.phases:
        full = [full_batch(b, module) for b in batches]
        result["infer"] = measure(InferStep(module, device, args.precision), full, device, args, case)
    for phase in ("train", "infer"):
        if args.profile and phase in result:
            print_top_ops(f"{case} {phase}", result[phase])
    del module, optimizer, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


RATIO_KEYS = ("ms", "host_ms", "device_ms", "peak_mb", "ops", "gflops", "traffic_gb")


def add_ratios(results: list[dict]) -> None:
    """x-baseline ratios for every metric, against the baseline preset of the same backbone and size."""
    base = {(r["backbone"], r["size"], r["batch"]): r for r in results if r["preset"] == "baseline"}
    for r in results:
        ref = base.get((r["backbone"], r["size"], r["batch"]))
        for phase in ("train", "infer"):
            if phase not in r:
                continue
            ratios = {}
            for key in RATIO_KEYS:
                value = getattr(r[phase], key)
                ref_value = getattr(ref[phase], key) if ref is not None and phase in ref else None
                ok = value is not None and ref_value and value == value and ref_value == ref_value
                ratios[key] = value / ref_value if ok else None
            r[f"{phase}_x"] = ratios


def fmt(value, digits: int = 1) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = []
    titles = {"train": "training step (training_step + backward + optimizer step)", "infer": "inference"}
    for phase, title in titles.items():
        rows = [r for r in results if phase in r]
        if not rows:
            continue
        lines += [f"**{title}**", ""]
        head = "| backbone | crop x batch | preset | ms | x | host ms | device ms | peak MB | x | syncs | ops | x |"
        head += " GFLOP | x | GB moved | x |"
        if phase == "train":
            head += " opt ops |"
        head += " warm-up s | other load |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            p, x = r[phase], r[f"{phase}_x"]
            cells = [
                r["backbone"],
                f"{r['size']} x {r['batch']}",
                r["preset"],
                fmt(p.ms),
                fmt(x["ms"], 2),
                fmt(p.host_ms),
                fmt(p.device_ms),
                fmt(p.peak_mb, 0),
                fmt(x["peak_mb"], 2),
                f"{p.step_syncs}/{p.syncs}" if phase == "train" else str(p.syncs),
                fmt(p.ops),
                fmt(x["ops"], 2),
                fmt(p.gflops),
                fmt(x["gflops"], 3),
                fmt(p.traffic_gb, 2),
                fmt(x["traffic_gb"], 3),
            ]
            if phase == "train":
                cells.append(fmt(p.opt_ops))
            cells += [fmt(p.warmup_s), fmt(p.other_load, 2)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict:
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "precision": args.precision,
        "compile": args.compile,
        "compile_backend": args.compile_backend,
        "channels_last": args.channels_last,
        "warmup": args.warmup,
        "iters": args.iters,
        "overrides": args.override,
    }
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated model presets")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated encoder names")
    parser.add_argument("--shapes", default=",".join(f"{s}x{b}" for s, b in SHAPES), help="crop x batch list")
    parser.add_argument("--size", type=int, help="one crop size instead of --shapes (with --batch)")
    parser.add_argument("--batch", type=int, help="one batch size instead of --shapes (with --size)")
    parser.add_argument("--phases", default="train,infer", help="train, infer or both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--compile", action="store_true", help="model.compile=true")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor)")
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last=true")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--counts-only", action="store_true", help="skip timing and memory; op, sync, FLOP and traffic counts"
    )
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the N ops with the most self time in one step"
    )
    parser.add_argument("--trace", type=Path, help="write one step's Chrome trace per case and phase here")
    args = parser.parse_args(argv)
    if (args.size is None) != (args.batch is None):
        parser.error("--size and --batch go together")
    if args.size is not None:
        args.shape_list = [(args.size, args.batch)]
    else:
        try:
            args.shape_list = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        except ValueError:
            parser.error(f"--shapes must look like 512x8,1024x2, got {args.shapes!r}")
    args.phases = [p for p in args.phases.split(",") if p]
    if not set(args.phases) <= {"train", "infer"} or not args.phases:
        parser.error(f"--phases takes train, infer or both, got {args.phases}")
    if args.counts_only and (args.profile or args.trace):
        parser.error("--profile and --trace profile a timed step; --counts-only times nothing")
    if args.warmup < 1 or args.iters < 1:
        parser.error("--warmup and --iters must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cpu":
        _set_mmap_threshold(SETTLED_MMAP_THRESHOLD)  # every case times under the same allocator setting
    if args.threads:
        torch.set_num_threads(args.threads)
    # Lightning warns once per module that self.log() has no Trainer here; the logged values are not needed
    warnings.filterwarnings("ignore", message=r".*self\.log\(\).*trainer.*", category=UserWarning)
    presets = [p for p in args.presets.split(",") if p]
    if "baseline" not in presets:
        presets.insert(0, "baseline")  # every ratio is against it
    results = []
    started = time.perf_counter()
    for backbone in [b for b in args.backbones.split(",") if b]:
        for size, batch in args.shape_list:
            for preset in presets:
                print(f"# {backbone} {size}x{batch} {preset} ...", file=sys.stderr, flush=True)
                results.append(run_case(preset, backbone, size, batch, args))
                print(f"# done: {_one_line(results[-1])}", file=sys.stderr, flush=True)
                if args.out:  # kept current: a run cut short keeps what it measured
                    args.out.write_text(json.dumps({"results": [_plain(r) for r in results]}, indent=1))
    add_ratios(results)
    env = environment(args) | {"seconds": round(time.perf_counter() - started, 1)}
    steps = "counts only, nothing timed" if args.counts_only else f"{args.warmup} warm-up + {args.iters} timed steps"
    print(
        f"device: {env.get('gpu', platform.processor() or env['machine'])}, torch {env['torch']}, "
        f"precision {args.precision}, compile {args.compile}, channels_last {args.channels_last}, "
        f"{steps}, {env['seconds']} s\n"
    )
    print(markdown(results, args))
    if args.out:
        payload = {"environment": env, "results": [_plain(r) for r in results]}
        args.out.write_text(json.dumps(payload, indent=1))
    return results


def _one_line(result: dict) -> str:
    parts = [f"{result['backbone']} {result['size']}x{result['batch']} {result['preset']}"]
    for phase in ("train", "infer"):
        if phase in result:
            p = result[phase]
            parts.append(f"{phase} {fmt(p.ms)} ms (host {fmt(p.host_ms)}, warm-up {fmt(p.warmup_s)} s)")
            if cost := new_shape_cost(p):
                parts.append(f"{phase}: {cost}")
    return ", ".join(parts)


def _plain(result: dict) -> dict:
    return {k: (vars(v) if isinstance(v, Phase) else v) for k, v in result.items()}


if __name__ == "__main__":
    main()
