"""Every command in README.md's ```bash blocks runs, at tiny settings, so the README cannot rot.

The README is parsed when the tests run. Each command is planned as one of:

* **run**: ``python train.py|eval.py|predict.py|scripts/<x>.py ...`` and ``python -m sgma.<module> ...``, with
  tiny overrides appended (:data:`TINY`), placeholders replaced by real files (:func:`resolve`: checkpoints
  of a tiny training run made first, fake dataset trees from :mod:`sgma.data.fake`, a prediction input
  folder, a local weights file) and the adaptations of :data:`ADAPT` (no network on test machines). Each
  command gets its own working directory and ``SGMA_LOG_DIR``; W&B runs offline (``WANDB_MODE=offline``
  wins over ``logger.wandb.offline=false``). It must exit 0 and write its outputs (the pattern table, the
  prediction);
* **compose**: a command listed in :data:`NOT_RUN` with the reason it cannot run here (GPUs); it is still
  composed with Hydra's ``--cfg job`` (each job of a multirun), so a misspelt key or option fails. The
  :data:`SLOW` commands (big encoders) are composed by the default test and run by the slow one;
* **make**: ``make <target>`` is dry-run (``make -n``), which fails for a target that does not exist.

Anything else (another program, an unknown placeholder, a table entry that matches no command) fails
:func:`test_every_readme_command_is_handled`, which names the command: extend the rules here when the
README gains a new kind of command.

Speed: the commands run in forked children of one server process that imports torch, Lightning, Hydra and
sgma once (``python tests/test_readme.py --serve``); each child is what ``python <script> args`` would be
(``runpy``, ``sys.argv``, its own cwd and environment), two or more at a time.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import itertools
import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BASH_BLOCK = re.compile(r"^```bash[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)

# Appended to every command of an entry point: tiny sizes and a fast logger. `debug=tiny` and `logger=csv`
# only when the command picks no debug preset / logger itself (a later group override would replace the command's).
TINY = {
    "train.py": ["debug=tiny", "logger=csv", "dataset.size=64"],
    "eval.py": ["eval.window=64"],  # whole-tile evaluation on the 96 px fake tiles
    "predict.py": ["window=64"],
}
NO_NETWORK = "no network on test machines: ImageNet weights cannot be downloaded, the encoder starts at random"
# command token -> (overrides appended, why)
ADAPT = {
    "backbone.pretrained=true": (["backbone.pretrained=false"], NO_NETWORK),
    "experiment=paper": (["backbone.pretrained=false"], NO_NETWORK),
}
# Commands that cannot run on a CPU test machine, matched by these tokens; they are composed, not run.
NOT_RUN = {
    "trainer=gpu": "needs a CUDA GPU",
    "trainer=ddp": "needs several CUDA GPUs (tests/test_mas.py runs trainer=ddp_cpu)",
    "hydra/launcher=submitit_slurm": "needs a SLURM cluster (tests/test_cluster.py resolves and checks its config)",
    **{f"experiment=paper_{name}": "DDP on 4 CUDA GPUs" for name in ("potsdam", "dfc2023", "deliver")},
}
# Commands too slow for the default suite (big encoders from random init: 10-30 s each on 2 CPU cores, against
# 2-4 s with mit_b0): the default test composes them, test_slow_readme_commands_run (marked slow) runs them.
SLOW = {
    "backbone=pvt_v2": "PVT-v2-b2",
    "backbone=resnet": "ResNet-50",
    "backbone=segformer,pvt_v2,resnet": "PVT-v2-b2 and ResNet-50",
    "experiment=paper": "PVT-v2-b2",
    # 4 subprocess jobs that import torch each (~1 min on 2 cores); tests/test_cluster.py runs a real 2-job
    # submitit_local sweep in the default suite
    "hydra/launcher=submitit_local": "4 jobs in their own processes",
    # 2 gloo processes (~15 s); tests/test_cluster.py runs the same eval.py command and compares it with 1 process
    "trainer.devices=2": "2 processes",
}
PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>|\b(PATH|FOLDER|DIR|FILE)\b")
FAKE_DATASETS = ("potsdam", "vaihingen", "dfc2023", "deliver", "folder")
CHANNELS = {"rgb": 3}  # prediction inputs: every other modality of the synthetic checkpoint has 1 band
JOB_TIMEOUT_S = 300
TOTAL_TIMEOUT_S = 900
MULTIRUN = ("-m", "--multirun")
PRELOAD = ("torch", "lightning.pytorch", "hydra", "wandb", "rasterio", "sgma.tasks", "sgma.inference")


# ------------------------------------------------------------------------------------------- parsing
def readme_commands(text: str) -> list[str]:
    """Every command of the ```bash blocks (continuation lines joined, comments dropped), each once."""
    commands: list[str] = []
    for block in BASH_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as err:
                raise ValueError(f"README.md: cannot parse the command line {line!r}: {err}") from err
            command = shlex.join(tokens)
            if tokens and command not in commands:
                commands.append(command)
    return commands


def sweep_values(arg: str) -> list[str]:
    """The choices of one multirun override: ``a=1,2`` -> [``a=1``, ``a=2``] (commas inside brackets kept)."""
    if "=" not in arg or arg.startswith(("-", "hydra.")):
        return [arg]
    key, value = arg.split("=", 1)
    values, depth, current = [], 0, ""
    for ch in value:
        depth += (ch in "[{(") - (ch in "]})")
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return [f"{key}={v}" for v in [*values, current]]


def sweep_combinations(args: list[str]) -> list[list[str]]:
    """The single-run overrides of every job of a Hydra multirun (the product of every override's choices)."""
    return [list(combo) for combo in itertools.product(*(sweep_values(a) for a in args if a not in MULTIRUN))]


# ------------------------------------------------------------------------------------------ planning
class Unhandled(Exception):
    """A README command the test does not know how to run."""


@dataclass
class Workspace:
    """The real files the README's placeholders stand for, made when needed (``make=False``: paths only)."""

    root: Path
    make: bool = True
    setup: dict[str, list[str]] = field(default_factory=dict)  # name -> train.py args of a setup run

    def checkpoint(self, tiles: bool) -> Path:
        """last.ckpt of a tiny run: synthetic data (the default config), or fake Potsdam for whole-tile eval."""
        name = "potsdam" if tiles else "synthetic"
        run = self.root / "setup" / name
        if name not in self.setup:
            args = [*TINY["train.py"], f"hydra.run.dir={run}"]
            if tiles:
                root = self.fake_root(self.root / "setup", "potsdam")
                args = ["dataset=potsdam", f"dataset.builder.root={root}", "model=baseline", "test=false", *args]
            self.setup[name] = args
        return run / "checkpoints" / "last.ckpt"

    def fake_root(self, where: Path, dataset: str) -> Path:
        if dataset not in FAKE_DATASETS:
            raise Unhandled(f"a data root for dataset={dataset}, which has no fake data")
        root = where / "data" / dataset
        if self.make and not root.exists():
            from sgma.data import fake

            getattr(fake, f"make_fake_{dataset}")(root)
        return root

    def predict_input(self, modalities: list[str]) -> Path:
        folder = self.root / "predict_input" / "+".join(modalities)
        if self.make and not folder.exists():
            import numpy as np

            from sgma.data.fake import write_geotiff

            rng = np.random.default_rng(0)
            for m in modalities:
                pixels = rng.integers(0, 255, (CHANNELS.get(m, 1), 72, 88), dtype=np.uint8)
                write_geotiff(folder / f"{m}.tif", pixels, origin=(366000.0, 5808000.0))
        return folder

    def weights(self, encoder: str) -> Path:
        path = self.root / "weights" / f"{encoder}.pth"
        if self.make and not path.exists():
            import torch

            from sgma.models.encoder import build_encoder

            path.parent.mkdir(parents=True, exist_ok=True)
            state = build_encoder(encoder).state_dict()
            torch.save({f"encoder.{k}": v for k, v in state.items()}, path)  # an smp model's layout
        return path


def resolve(args: list[str], ws: Workspace, cwd: Path) -> tuple[list[str], list[str]]:
    """Hydra overrides with the placeholders replaced by real files; also the notes saying what was replaced."""
    out, notes = [], []
    datasets = [a.split("=", 1)[1] for a in args if a.startswith("dataset=")]
    # a per-dataset recipe (experiment=paper_potsdam) picks its dataset itself
    datasets = [a.split("=", 1)[1].removeprefix("paper_") for a in args if a.startswith("experiment=paper_")] + datasets
    dataset = datasets[-1] if datasets else None
    if dataset == "...":
        dataset = "potsdam"
        out.append(f"dataset.builder.root={ws.fake_root(cwd, dataset)}")
        notes.append("dataset=... -> the fake Potsdam tree")
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "dataset" and value == "...":
            arg = "dataset=potsdam"
        elif key == "ckpt_path" and not Path(value).is_file():
            tiles = "eval.full_tile=true" in args
            arg = f"ckpt_path={ws.checkpoint(tiles)}"
            notes.append(f"ckpt_path -> last.ckpt of a tiny {'fake Potsdam' if tiles else 'synthetic'} run")
        elif key == "input" and not Path(value).is_dir():
            pattern = next((a.split("=", 1)[1] for a in args if a.startswith("pattern=")), "rgb+nir+dsm")
            arg = f"input={ws.predict_input(pattern.split('+'))}"
            notes.append("input -> a folder of GeoTIFFs, one per modality of the pattern")
        elif key == "dataset.builder.root" and not Path(value).is_dir():
            if dataset is None:
                raise Unhandled(f"{arg}: a data root without dataset=<name>")
            arg = f"dataset.builder.root={ws.fake_root(cwd, dataset)}"
            notes.append(f"dataset.builder.root -> a fake {dataset} tree (sgma.data.fake)")
        elif key == "backbone.pretrained" and value.endswith((".pth", ".pt")) and not Path(value).exists():
            arg = f"backbone.pretrained={ws.weights(Path(value).stem)}"
            notes.append(f"backbone.pretrained -> a saved {Path(value).stem} state dict")
        if PLACEHOLDER.search(arg):
            raise Unhandled(f"placeholder in {arg!r} that the test cannot fill")
        out.append(arg)
    return out, notes


@dataclass
class Plan:
    command: str
    kind: str  # run | compose | make
    argvs: list[list[str]] = field(default_factory=list)  # [script, *args] or [-m, module, *args]; make: targets
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reports: int = 0  # pattern tables the command must write
    predicts: bool = False
    cwd: Path | None = None


def plan(command: str, ws: Workspace, cwd: Path, *, slow: bool = False) -> Plan | None:
    """How to run one README command here (raises :class:`Unhandled`). ``slow``: the plan of a :data:`SLOW`
    command, None for the others; otherwise SLOW commands are only composed."""
    tokens = shlex.split(command)
    env = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    if not tokens:
        raise Unhandled("only environment assignments")
    program, *rest = tokens
    if program == "make":
        targets = [t for t in rest if not t.startswith("-") and "=" not in t]
        if not targets:
            raise Unhandled("make without a target")
        return None if slow else Plan(command, "make", argvs=[targets], env=env)
    if program not in ("python", "python3"):
        raise Unhandled(f"program {program!r}: the test runs python and make commands only")
    if rest[:1] == ["-m"]:
        if len(rest) < 2 or not rest[1].startswith("sgma."):
            raise Unhandled("python -m: only sgma modules are run")
        module, args = rest[1], rest[2:]
        entry = f"-m {module}"
        head = ["-m", module]
    else:
        if not rest or not rest[0].endswith(".py"):
            raise Unhandled("python without a script")
        script = REPO / rest[0]
        if not script.is_file():
            raise Unhandled(f"no such script {rest[0]} in the repository")
        entry, args, head = str(Path(rest[0])), rest[1:], [str(script)]
    heavy = [f"slow ({why}): run by test_slow_readme_commands_run" for token, why in SLOW.items() if token in args]
    if slow and (not heavy or any(token in args for token in NOT_RUN)):
        return None
    args, notes = resolve(args, ws, cwd)
    blocked = [reason for token, reason in NOT_RUN.items() if token in args]
    if blocked or (heavy and not slow):  # composed only: every job of a multirun on its own (--cfg excludes -m)
        argvs = [[*head, *combo, "--cfg", "job"] for combo in sweep_combinations(args)]
        return Plan(command, "compose", argvs=argvs, env=env, notes=blocked or heavy, cwd=cwd)
    for token, (extra, why) in ADAPT.items():
        if token in args:
            args += extra
            notes.append(f"{' '.join(extra)}: {why}")
    for extra in TINY.get(entry, []):
        group = extra.split("=")[0]
        if group in ("debug", "logger") and any(a.split("=")[0].split(".")[0].lstrip("+~") == group for a in args):
            continue
        args.append(extra)
    reports = 0
    if entry in ("train.py", "eval.py") and "test=false" not in args:
        reports = len(sweep_combinations(args)) if any(a in MULTIRUN for a in args) else 1
    return Plan(
        command,
        "run",
        argvs=[[*head, *args]],
        env=env,
        notes=notes,
        reports=reports,
        predicts=entry == "predict.py",
        cwd=cwd,
    )


def plan_all(root: Path, *, make: bool, slow: bool = False) -> tuple[list[Plan], dict[str, str], Workspace]:
    """Plans of the README commands (``slow``: of the :data:`SLOW` ones only), the commands that cannot be
    handled (with why), and the workspace holding the files the plans need."""
    ws = Workspace(root, make=make)
    plans, unhandled = [], {}
    for i, command in enumerate(readme_commands(README.read_text())):
        cwd = root / f"cmd{i:02d}"
        try:
            planned = plan(command, ws, cwd, slow=slow)
        except Unhandled as err:
            unhandled[command] = str(err)
            continue
        if planned is not None:
            plans.append(planned)
            if make:
                cwd.mkdir(parents=True, exist_ok=True)
    return plans, unhandled, ws


# ------------------------------------------------------------------------------------- fork server
def serve() -> None:
    """Read jobs (JSON) on stdin; run each in a forked child, phase by phase; print one JSON line per job."""
    jobs = json.load(sys.stdin)
    for module in PRELOAD:
        importlib.import_module(module)
    gc.collect()
    gc.freeze()  # children's garbage collections then leave the shared heap alone (no copy-on-write storm)
    workers = max(1, min(os.cpu_count() or 1, 4))
    threads = max(1, (os.cpu_count() or 1) // workers)
    for phase in sorted({job["phase"] for job in jobs}):
        pending = [job for job in jobs if job["phase"] == phase]
        running: dict[int, tuple[dict, float]] = {}
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                pid = os.fork()
                if pid == 0:
                    _child(job, threads)  # never returns
                running[pid] = (job, time.monotonic())
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                for child, (_, start) in running.items():
                    if time.monotonic() - start > JOB_TIMEOUT_S:
                        os.kill(child, signal.SIGKILL)
                time.sleep(0.05)
                continue
            job, start = running.pop(pid)
            rc = os.waitstatus_to_exitcode(status)
            print(json.dumps({"key": job["key"], "rc": rc, "seconds": round(time.monotonic() - start, 1)}), flush=True)
            busy = [*pending, *(other for other, _ in running.values())]
            if job.get("prune") and not any(other["cwd"] == job["cwd"] for other in busy):
                for ckpt in Path(job["cwd"]).rglob("*.ckpt"):  # the checks read tables and predictions only
                    ckpt.unlink()


def _child(job: dict, threads: int) -> None:
    """Become ``python <argv>`` in ``job["cwd"]``: output to the job's log, exit with the command's status."""
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
    import torch
    from wandb.sdk.data_types._private import MEDIA_TMP

    torch.set_num_threads(threads)  # the children share the cores
    # wandb makes its media folder (a TemporaryDirectory) at import, i.e. once in this server: a child's exit
    # would delete it under every other child, so only the server's exit removes it
    MEDIA_TMP._finalizer.detach()
    atexit.unregister(MEDIA_TMP.cleanup)
    argv, code = job["argv"], 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = job["cwd"]  # what `python -m` puts first
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).parent)  # what `python script.py` puts first
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:  # what the interpreter makes of sys.exit(...)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    # an interpreter's exit without the teardown of every module, which would copy the shared heap
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_jobs(jobs: list[dict]) -> dict[str, dict]:
    """Run jobs through the fork server; results by job key."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,  # its own process group: a timeout kills the children too
    )
    try:
        out, err = server.communicate(json.dumps(jobs), timeout=TOTAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        out, err = server.communicate()
    results = {r["key"]: r for r in map(json.loads, out.splitlines())}
    if server.returncode != 0 or len(results) != len(jobs):
        raise RuntimeError(f"the command server failed (exit {server.returncode}):\n{err[-4000:]}")
    return results


# ------------------------------------------------------------------------------------------- tests
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}


def test_readme_parsing():
    text = "x\n```bash\npython a.py k=1   # c\npython b.py \\\n    k=2 'q=[a, b]'\n\n# only a comment\n```\n"
    text += "```\npython not/a/bash/block.py\n```\n```bash\npython a.py k=1\n```\n"
    assert readme_commands(text) == ["python a.py k=1", "python b.py k=2 'q=[a, b]'"]
    combos = sweep_combinations(["-m", "a=1,2,3", "b=x,y", "c=[1,2]", "hydra.sweep.dir=d"])
    assert len(combos) == 6 and combos[1] == ["a=1", "b=y", "c=[1,2]", "hydra.sweep.dir=d"]


def test_every_readme_command_is_handled(tmp_path):
    commands = readme_commands(README.read_text())
    assert any(c.startswith("python train.py") for c in commands), "no python train.py command found in README.md"
    plans, unhandled, _ = plan_all(tmp_path, make=False)
    assert not unhandled, "README commands this test cannot run; extend tests/test_readme.py:\n" + "\n".join(
        f"  {command}\n      {why}" for command, why in unhandled.items()
    )
    tokens = [shlex.split(c) for c in commands]
    for name, table in (("NOT_RUN", NOT_RUN), ("SLOW", SLOW), ("ADAPT", ADAPT)):
        stale = [token for token in table if not any(token in t for t in tokens)]
        assert not stale, f"{name} entries that match no README command (remove them): {stale}"
    assert {p.kind for p in plans} <= {"run", "compose", "make"}


def _run_readme(tmp_path: Path, *, slow: bool) -> None:
    started = time.monotonic()
    plans, unhandled, ws = plan_all(tmp_path, make=True, slow=slow)
    failures = [f"  {command}\n      cannot be handled: {why}" for command, why in unhandled.items()]
    for p in plans:
        if p.kind == "make":
            proc = subprocess.run(["make", "-n", "-C", str(REPO), *p.argvs[0]], capture_output=True, text=True)
            if proc.returncode != 0:
                failures.append(f"  {p.command}\n      make -n failed: {proc.stderr.strip()[-500:]}")
    jobs = [
        {
            "key": f"setup:{name}",
            "phase": 0,
            "argv": [str(REPO / "train.py"), *args],
            "cwd": str(tmp_path),
            "env": ENV,
            "log": str(tmp_path / f"setup-{name}.log"),
        }
        for name, args in ws.setup.items()
    ]
    runs = [p for p in plans if p.kind in ("run", "compose")]
    runs.sort(key=lambda p: (not any(a in MULTIRUN for a in p.argvs[0]), p.kind == "compose"))  # long ones first
    for p in runs:
        env = {**ENV, "SGMA_LOG_DIR": str(p.cwd / "logs"), **p.env}
        for i, argv in enumerate(p.argvs):
            log = str(p.cwd / f"out{i}.log")
            # prune: its checkpoints (~50 MB each, 3.5 GB over the README) go when the command's last job ends
            job = {"key": f"{i}:{p.command}", "phase": 1, "argv": argv, "cwd": str(p.cwd), "env": env, "log": log}
            jobs.append(job | {"prune": True})
    results = run_jobs(jobs)
    for name in ws.setup:
        if results[f"setup:{name}"]["rc"] != 0:
            tail = (tmp_path / f"setup-{name}.log").read_text()[-3000:]
            pytest.fail(f"the tiny {name} run that README placeholders point to failed:\n{tail}")
    for p in runs:
        problems, failed = [], None
        for i in range(len(p.argvs)):
            if results[f"{i}:{p.command}"]["rc"] != 0:
                rc = results[f"{i}:{p.command}"]["rc"]
                problems.append(f"exit status {rc}" + (f" (killed after {JOB_TIMEOUT_S} s)" if rc == -9 else ""))
                failed = i
                break
        if failed is None and p.kind == "run":
            tables = list((p.cwd / "logs").rglob("patterns.json")) if (p.cwd / "logs").is_dir() else []
            if len(tables) != p.reports:
                problems.append(f"{len(tables)} pattern table(s) written, expected {p.reports}")
            if p.predicts and not list(p.cwd.rglob("prediction.*")):
                problems.append("no prediction file written")
        if problems:
            i = failed or 0
            tail = "\n".join("        " + line for line in (p.cwd / f"out{i}.log").read_text().splitlines()[-25:])
            how = shlex.join(a.replace(str(tmp_path), "<tmp>") for a in p.argvs[i])
            notes = "".join(f"\n      ({note})" for note in p.notes)
            failures.append(f"  {p.command}\n      {'; '.join(problems)}\n      ran: python {how}{notes}\n{tail}")
    print(f"{len(jobs)} commands in {time.monotonic() - started:.0f} s:")
    for r in sorted(results.values(), key=lambda r: -r["seconds"]):
        print(f"  {r['seconds']:6.1f} s  {r['key']}")
    assert not failures, "README commands that fail:\n" + "\n".join(failures)


def test_readme_commands_run(tmp_path):
    """Every README command except the SLOW ones (composed only) runs at tiny settings."""
    _run_readme(tmp_path, slow=False)


@pytest.mark.slow
def test_slow_readme_commands_run(tmp_path):
    """The SLOW README commands (big encoders) run at tiny settings."""
    _run_readme(tmp_path, slow=True)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
