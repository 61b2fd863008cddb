"""Fusion cost benchmark: SGF vs mean fusion with the same backbone, same machine, same inputs, one run.

Answers "what does SGF cost over the plain mean-fusion baseline?" (issue #3). Both segmentors are built
with the same backbone (random init, nothing is downloaded), 3 modalities (rgb 3ch, nir 1ch, dsm 1ch),
all available, K=6 classes, and run on the same random inputs and labels.

Usage::

    .venv/bin/python scripts/bench_fusion.py                     # full run: 128/256/512, CPU, mit_b0
    .venv/bin/python scripts/bench_fusion.py --markdown          # same, table in markdown
    .venv/bin/python scripts/bench_fusion.py --params            # parameter table over six backbones
    .venv/bin/python scripts/bench_fusion.py --profile --sizes 512  # where SGF spends its time

Phases (per batch):

- ``inference``: ``model.eval()`` under ``torch.inference_mode()``, one forward.
- ``training``: ``model.train()``, forward, cross-entropy on random labels, backward, ``zero_grad``
  (no optimizer step: it costs the same for both fusions up to the number of parameters).

Timing: both models live in one process and are run alternately, ABAB on even iterations and BABA on odd
ones, so slow drift (thermal, other load, allocator state) hits both alike. ``--warmup`` untimed
iterations per model, then the **median** of ``--iters`` timed iterations (``--large-iters`` for sizes of
512 and more, where one training step takes seconds on CPU). On CUDA every timed call is bracketed by
``torch.cuda.synchronize()``. ``torch.set_num_threads`` is left at its default.

Shared machines: a second CPU-heavy process on a 2-core box oversubscribes torch's OpenMP threads and
inflates times very unevenly (many small ops suffer more than a few big GEMMs), so ratios under load are
not trustworthy. So the other processes' load (cores used by everyone else plus hypervisor steal, from
``/proc/stat`` minus this process's own CPU time) is tracked: before each timed block the script waits
(``--quiet-wait`` s at most) until it is < 0.2 cores; timed AB pairs are grouped in chunks of >= 1 s and a
chunk that ran while others used >= 0.25 cores is dropped and re-run (at most ``--max-pairs-factor`` times
the wanted pairs are run; if fewer than 3 quiet pairs remain, all pairs are used). The table's
``other load`` column is the average load of others over the pairs used; rows at >= 0.25 are marked ``!``.

Peak memory: measured in a **fresh subprocess per (fusion, size, phase)**, so no model, cache or
allocator state of another configuration is in the process. The subprocess builds the model and inputs,
runs one warm-up step of the phase (one-time buffers such as oneDNN primitives are then in the baseline),
and measures one more step:

- CPU: the subprocess runs with ``MALLOC_MMAP_THRESHOLD_=131072``, which makes glibc serve every large
  buffer with its own mmap and return it to the OS on free (it also turns off glibc's dynamic threshold,
  which would otherwise keep freed activations in the heap and hide them from RSS). The kernel's peak-RSS
  mark is reset by writing ``5`` to ``/proc/self/clear_refs`` right before the step; the reported peak is
  ``VmHWM`` after the step minus ``VmRSS`` before it, i.e. the extra resident memory the step needed
  (activations, autograd buffers, gradients, workspaces; not the weights and inputs). ``tracemalloc`` is
  not used: it does not see torch's allocator. Where ``clear_refs`` is unavailable the fallback is
  ``ru_maxrss`` after the step minus ``ru_maxrss`` before it (a lower bound).
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``torch.cuda.memory_allocated()`` before the step.

Targets (CPU, mit_b0, at 512 px): SGF/mean inference time <= 1.15, training time <= 1.25, peak memory
<= 1.3. They are reported as PASS/MISS; the exit code is 0 either way, this is a measurement.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sgma.modalities import Modality
from sgma.models.segmentor import MultiModalSegmentor

MODALITIES = (
    Modality("rgb", 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    Modality("nir", 1, (0.0,), (1.0,)),
    Modality("dsm", 1, (0.0,), (1.0,)),
)
NUM_CLASSES = 6
FUSIONS = ("mean", "sgf")
PHASES = ("inference", "training")
PARAM_BACKBONES = ("mit_b0", "mit_b2", "tu-pvt_v2_b0", "tu-pvt_v2_b2", "resnet18", "resnet50")
TARGET_SIZE = 512
TIME_TARGETS = {"inference": 1.15, "training": 1.25}
MEMORY_TARGET = 1.3
LARGE_SIZE = 512  # sizes >= this use --large-iters
QUIET = 0.2  # cores used by other processes below which the machine counts as quiet
LOADED = 0.25  # rows timed while other processes used this many cores or more are flagged with "!"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # see the module docstring, "Peak memory"


# ---------------------------------------------------------------------------------------------------------
# models, inputs, one step


def build_model(fusion: str, backbone: str, sgf_options: dict, seed: int = 0) -> MultiModalSegmentor:
    torch.manual_seed(seed)  # same encoder init for both fusions (the encoder is built first)
    return MultiModalSegmentor(
        modalities=MODALITIES,
        num_classes=NUM_CLASSES,
        backbone=backbone,
        pretrained=False,
        fusion=fusion,
        fusion_options={"sgf": sgf_options},
    )


@dataclass
class Batch:
    inputs: dict[str, Tensor]
    available: Tensor  # (B, M) bool, all True
    labels: Tensor  # (B, H, W)


def make_batch(size: int, batch_size: int, device: torch.device, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed + size)
    inputs = {m.name: torch.randn(batch_size, m.channels, size, size, generator=gen) for m in MODALITIES}
    labels = torch.randint(0, NUM_CLASSES, (batch_size, size, size), generator=gen)
    available = torch.ones(batch_size, len(MODALITIES), dtype=torch.bool)
    return Batch(
        inputs={k: v.to(device) for k, v in inputs.items()},
        available=available.to(device),
        labels=labels.to(device),
    )


def set_phase(model: nn.Module, phase: str) -> None:
    model.train(phase == "training")


def step(model: MultiModalSegmentor, phase: str, batch: Batch) -> None:
    """One batch of ``phase``; the model must already be in the matching mode (see :func:`set_phase`)."""
    if phase == "inference":
        with torch.inference_mode():
            model(batch.inputs, batch.available)
        return
    out = model(batch.inputs, batch.available)
    F.cross_entropy(out.logits, batch.labels).backward()
    model.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# other load on the machine (the benchmark machine may be shared)


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine incl. steal, CPU seconds of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest is inside user
    own = os.times()
    return busy, own.user + own.system


class OtherLoad:
    """Average number of cores used by *other* processes (and the hypervisor, as steal) over a window."""

    def __init__(self) -> None:
        self.start = _cpu_seconds()
        self.wall = time.perf_counter()

    def cores(self) -> float:
        end = _cpu_seconds()
        if self.start is None or end is None:
            return float("nan")
        elapsed = max(time.perf_counter() - self.wall, 1e-9)
        return max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1])) / elapsed


def wait_for_quiet(max_wait: float, threshold: float) -> float:
    """Sleep in 1 s windows until other processes use < ``threshold`` cores, at most ``max_wait`` s.

    Returns the load of the last window (NaN when it cannot be measured)."""
    start = time.perf_counter()
    while True:
        window = OtherLoad()
        time.sleep(1.0)
        load = window.cores()
        waited = time.perf_counter() - start
        if not load >= threshold or waited >= max_wait:  # NaN counts as quiet
            if waited > 1.5:
                state = "quiet" if not load >= threshold else "still busy, going on"
                print(f"  waited {waited:.0f} s for a quiet machine: {state} ({load:.2f} cores)", file=sys.stderr)
            return load


# ---------------------------------------------------------------------------------------------------------
# timing (in process, interleaved)


@dataclass
class BlockTimes:
    times: dict[str, list[float]]  # seconds of the kept timed steps, per fusion
    other_cores: float  # average load of other processes over the kept chunks
    kept: int  # AB pairs used (all of them when fewer than 3 were quiet)
    run: int  # timed AB pairs run (kept + dropped as loaded)


def time_block(
    models: dict[str, MultiModalSegmentor],
    phase: str,
    batch: Batch,
    *,
    warmup: int,
    iters: int,
    device: torch.device,
    max_pairs: int,
) -> BlockTimes:
    """Alternate the fusions (AB, BA, AB, ...): ``warmup`` untimed pairs, then timed pairs in chunks of >= 1 s.

    A chunk during which other processes used >= ``LOADED`` cores is dropped and run again, until ``iters``
    pairs are kept or ``max_pairs`` were run; then the quiet pairs are used if there are 3 or more, else all.
    """
    names = list(models)
    for model in models.values():
        set_phase(model, phase)

    def pair(i: int) -> dict[str, float]:
        order = names if i % 2 == 0 else names[::-1]
        return {n: timed(lambda n=n: step(models[n], phase, batch), device) for n in order}

    for i in range(warmup):
        pair(i)
    kept: list[dict[str, float]] = []
    dropped: list[dict[str, float]] = []
    kept_load: list[tuple[float, float]] = []  # (cores, seconds) per kept chunk
    dropped_load: list[tuple[float, float]] = []
    i = warmup
    while len(kept) < iters and len(kept) + len(dropped) < max_pairs:
        load, chunk = OtherLoad(), []
        start = time.perf_counter()
        while len(kept) + len(chunk) < iters and (not chunk or time.perf_counter() - start < 1.0):
            chunk.append(pair(i))
            i += 1
        cores, seconds = load.cores(), time.perf_counter() - start
        if cores >= LOADED:
            dropped += chunk
            dropped_load.append((cores, seconds))
        else:  # quiet, or not measurable (NaN)
            kept += chunk
            kept_load.append((cores, seconds))
    run = len(kept) + len(dropped)
    if len(kept) < min(3, iters):
        kept, kept_load = kept + dropped, kept_load + dropped_load
    total = sum(sec for _, sec in kept_load)
    other = sum(c * sec for c, sec in kept_load) / total if total > 0 else float("nan")
    times = {n: [p[n] for p in kept] for n in names}
    return BlockTimes(times=times, other_cores=other, kept=len(kept), run=run)


# ---------------------------------------------------------------------------------------------------------
# peak memory (one fresh subprocess per configuration)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


def _maxrss_kb() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1024 if sys.platform == "darwin" else 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale


def memory_worker(fusion: str, size: int, phase: str, args: argparse.Namespace) -> dict:
    """Runs inside the subprocess: peak extra memory (MiB) of one step of ``phase``."""
    device = torch.device(args.device)
    model = build_model(fusion, args.backbone, args.sgf_options).to(device)
    batch = make_batch(size, args.batch_size, device)
    set_phase(model, phase)
    step(model, phase, batch)  # warm-up: one-time buffers go into the baseline
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(model, phase, batch)
        sync(device)
        return {"peak_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20, "method": "cuda"}
    if _reset_peak_rss():
        base_kb = _proc_status_kb("VmRSS")
        step(model, phase, batch)
        peak_kb = _proc_status_kb("VmHWM")
        return {"peak_mb": (peak_kb - base_kb) / 1024, "method": "VmHWM-VmRSS", "base_mb": base_kb / 1024}
    base_kb = _maxrss_kb()
    step(model, phase, batch)
    return {"peak_mb": (_maxrss_kb() - base_kb) / 1024, "method": "ru_maxrss (lower bound)"}


def measure_memory(fusion: str, size: int, phase: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-worker",
        f"{fusion},{size},{phase}",
        "--backbone",
        args.backbone,
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
    ]
    for key, value in args.sgf_options.items():
        cmd += ["--sgf-option", f"{key}={value!r}"]
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {fusion}/{size}/{phase} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# reporting


@dataclass
class Row:
    size: int
    phase: str
    time_s: dict[str, float]  # median seconds per fusion
    peak_mb: dict[str, float]
    other_cores: float  # average cores used by other processes while this row was timed

    @property
    def time_ratio(self) -> float:
        return self.time_s["sgf"] / self.time_s["mean"]

    @property
    def memory_ratio(self) -> float:
        mean = self.peak_mb["mean"]
        return float("inf") if mean == 0 else self.peak_mb["sgf"] / mean  # NaN when not measured


HEADER = (
    "size",
    "phase",
    "mean ms",
    "SGF ms",
    "time ratio",
    "mean peak MB",
    "SGF peak MB",
    "mem ratio",
    "other load",
)


def format_rows(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    return [
        (
            str(r.size),
            r.phase,
            f"{1e3 * r.time_s['mean']:.1f}",
            f"{1e3 * r.time_s['sgf']:.1f}",
            f"{r.time_ratio:.2f}",
            f"{r.peak_mb['mean']:.0f}",
            f"{r.peak_mb['sgf']:.0f}",
            f"{r.memory_ratio:.2f}",
            f"{r.other_cores:.2f}" + (" !" if r.other_cores >= LOADED else ""),
        )
        for r in rows
    ]


def render_table(header: Sequence[str], cells: Sequence[Sequence[str]], *, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in cells])


def target_lines(rows: Sequence[Row]) -> list[str]:
    sizes = sorted({r.size for r in rows})
    size = TARGET_SIZE if TARGET_SIZE in sizes else sizes[-1]
    note = "" if size == TARGET_SIZE else f" (targets are defined at {TARGET_SIZE}; evaluated at {size})"
    lines = []
    for r in (r for r in rows if r.size == size):
        limit = TIME_TARGETS[r.phase]
        verdict = "PASS" if r.time_ratio <= limit else "MISS"
        lines.append(f"{verdict}  {r.phase} time ratio @ {size}: {r.time_ratio:.2f} (target <= {limit}){note}")
    for r in (r for r in rows if r.size == size):
        if math.isnan(r.memory_ratio):
            continue  # --no-memory
        verdict = "PASS" if r.memory_ratio <= MEMORY_TARGET else "MISS"
        lines.append(
            f"{verdict}  {r.phase} peak memory ratio @ {size}: {r.memory_ratio:.2f} (target <= {MEMORY_TARGET}){note}"
        )
    return lines


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "n/a"


def machine_lines(args: argparse.Namespace) -> list[str]:
    device = torch.device(args.device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    host = f"{platform.machine()} {platform.system()} {platform.release()}"
    names = "+".join(m.name for m in MODALITIES)
    sgf = args.sgf_options or "defaults"
    return [
        f"date: {now}",
        f"machine: {host}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}, device={args.device}{gpu}",
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"load average at start: {load_average()}",
        f"backbone={args.backbone}, batch={args.batch_size}, modalities={names} (all available), "
        f"classes={NUM_CLASSES}, sgf options={sgf}",
        f"timing: median of {args.iters} iters ({args.large_iters} at >= {LARGE_SIZE} px) after "
        f"{args.warmup} warm-up, fusions alternated ABAB/BABA",
        "peak memory: fresh subprocess per (fusion, size, phase), extra resident memory of one step",
    ]


def param_cells(backbones: Sequence[str], sgf_options: dict) -> list[tuple[str, ...]]:
    cells = []
    for backbone in backbones:
        mean = count_params(build_model("mean", backbone, sgf_options))
        sgf_model = build_model("sgf", backbone, sgf_options)
        sgf = count_params(sgf_model)
        fusion = count_params(sgf_model.fusion)
        cells.append(
            (
                backbone,
                f"{mean / 1e6:.3f}",
                f"{sgf / 1e6:.3f}",
                f"{(sgf - mean) / 1e6:.3f}",
                f"{fusion / 1e6:.3f}",
                f"{100 * (sgf - mean) / mean:.1f}%",
            )
        )
    return cells


PARAM_HEADER = (
    "backbone",
    "mean fusion (M)",
    "SGF fusion (M)",
    "difference (M)",
    "SGF modules (M)",
    "increase",
)


# ---------------------------------------------------------------------------------------------------------
# profiling


def profile_sgf(args: argparse.Namespace, size: int) -> None:
    """Forward breakdown by module (wall clock via hooks) and the top ops of SGF's forward and train step."""
    device = torch.device(args.device)
    batch = make_batch(size, args.batch_size, device)
    models = {f: build_model(f, args.backbone, args.sgf_options).to(device) for f in FUSIONS}
    print(f"\n== profile at {size} px, batch {args.batch_size} ==")
    for phase in PHASES:
        for name, model in models.items():
            set_phase(model, phase)
            step(model, phase, batch)  # warm-up
            totals: dict[str, float] = {}
            handles = []
            watched = [("encoder", model.encoder), ("head", model.head)]
            for i, fusion in enumerate(model.fusion):
                watched.append((f"fusion[{i}]", fusion))
                for n, child in fusion.named_children():  # a ModuleList is never called: watch its items
                    items = child.named_children() if isinstance(child, nn.ModuleList) else [("", child)]
                    watched += [(f"fusion[{i}].{n}{'.' + j if j else ''}", m) for j, m in items]
            for label, module in watched:
                starts: list[float] = []

                def pre(_m, _a, starts=starts):
                    sync(device)
                    starts.append(time.perf_counter())

                def post(_m, _a, _o, starts=starts, label=label, totals=totals):
                    sync(device)
                    totals[label] = totals.get(label, 0.0) + time.perf_counter() - starts.pop()

                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
            total = timed(lambda model=model, phase=phase: step(model, phase, batch), device)
            for h in handles:
                h.remove()
            print(f"\n-- {name} {phase}: step {1e3 * total:.0f} ms; forward time by module (ms):")
            for label, seconds in totals.items():
                if seconds * 1e3 >= 0.5 or "." not in label:
                    print(f"   {label:32s} {1e3 * seconds:9.1f}")
        sgf = models["sgf"]
        set_phase(sgf, phase)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            step(sgf, phase, batch)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n-- sgf {phase}: top ops by self time")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=48))


# ---------------------------------------------------------------------------------------------------------
# CLI


def parse_sgf_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--sgf-option wants key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="mit_b0")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="input sides (multiples of 32)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    p.add_argument("--iters", type=int, default=20, help="timed steps per model (median reported)")
    p.add_argument("--large-iters", type=int, default=6, help=f"timed steps at sizes >= {LARGE_SIZE}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help=f"before each timed block, wait up to this many seconds for other processes to use < {QUIET} cores",
    )
    p.add_argument(
        "--max-pairs-factor",
        type=int,
        default=4,
        help="run at most this many times the wanted timed pairs, replacing pairs timed under load",
    )
    p.add_argument("--markdown", action="store_true", help="print the tables in markdown")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--params", action="store_true", help="only print the parameter table over --param-backbones")
    p.add_argument("--param-backbones", nargs="+", default=list(PARAM_BACKBONES))
    p.add_argument("--profile", action="store_true", help="only profile both fusions at the largest size")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument(
        "--sgf-option",
        type=parse_sgf_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="SGF constructor option (repeatable), e.g. num_heads=2",
    )
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: "fusion,size,phase"
    args = p.parse_args(argv)
    args.sgf_options = dict(args.sgf_option)
    if any(s % 32 for s in args.sizes):
        p.error(f"--sizes must be multiples of 32, got {args.sizes}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        fusion, size, phase = args.memory_worker.split(",")
        print(json.dumps(memory_worker(fusion, int(size), phase, args)))
        return 0
    if args.params:
        cells = param_cells(args.param_backbones, args.sgf_options)
        print(f"Parameters, {len(MODALITIES)} modalities, {NUM_CLASSES} classes (M = 1e6):")
        print(render_table(PARAM_HEADER, cells, markdown=args.markdown))
        return 0
    if args.profile:
        profile_sgf(args, max(args.sizes))
        return 0

    device = torch.device(args.device)
    bullet = "- " if args.markdown else ""
    for line in machine_lines(args):
        print(bullet + line)
    models = {f: build_model(f, args.backbone, args.sgf_options).to(device) for f in FUSIONS}
    n_mean, n_sgf = count_params(models["mean"]), count_params(models["sgf"])
    print(
        f"{bullet}params: mean {n_mean / 1e6:.3f} M, SGF {n_sgf / 1e6:.3f} M, "
        f"SGF adds {(n_sgf - n_mean) / 1e6:.3f} M (+{100 * (n_sgf - n_mean) / n_mean:.1f}%)"
    )

    times: dict[tuple[int, str], dict[str, float]] = {}
    other: dict[tuple[int, str], float] = {}
    for size in args.sizes:
        batch = make_batch(size, args.batch_size, device)
        iters = args.large_iters if size >= LARGE_SIZE else args.iters
        for phase in PHASES:
            wait_for_quiet(args.quiet_wait, QUIET)
            start = time.perf_counter()
            block = time_block(
                models,
                phase,
                batch,
                warmup=args.warmup,
                iters=iters,
                device=device,
                max_pairs=args.max_pairs_factor * iters,
            )
            other[size, phase] = block.other_cores
            times[size, phase] = {f: statistics.median(ts) for f, ts in block.times.items()}
            spread = ", ".join(f"{f} {1e3 * min(ts):.0f}-{1e3 * max(ts):.0f} ms" for f, ts in block.times.items())
            print(
                f"  timed {size:4d} {phase:9s} in {time.perf_counter() - start:5.1f} s ({spread}; kept "
                f"{block.kept}/{block.run} pairs; other processes {block.other_cores:.2f} cores)",
                file=sys.stderr,
            )
        del batch
    del models
    gc.collect()

    peaks: dict[tuple[int, str], dict[str, float]] = {}
    for size in args.sizes:
        for j, phase in enumerate(PHASES):
            order = FUSIONS if j % 2 == 0 else FUSIONS[::-1]
            peaks[size, phase] = {}
            for fusion in order:
                if args.no_memory:
                    peaks[size, phase][fusion] = float("nan")
                    continue
                result = measure_memory(fusion, size, phase, args)
                peaks[size, phase][fusion] = result["peak_mb"]
                print(f"  memory {size:4d} {phase:9s} {fusion:4s}: {result}", file=sys.stderr)

    rows = [
        Row(size, phase, times[size, phase], peaks[size, phase], other[size, phase])
        for size in args.sizes
        for phase in PHASES
    ]
    print()
    print(render_table(HEADER, format_rows(rows), markdown=args.markdown))
    print()
    for line in target_lines(rows):
        print(bullet + line)
    if any(r.other_cores >= LOADED for r in rows):
        print(
            f"{bullet}note: rows marked ! were timed while other processes used >= {LOADED} cores on average; "
            "their times and ratios are less trustworthy"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
