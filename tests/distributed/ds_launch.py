"""Run ditscale.train on N CPU ranks through the deepspeed launcher, with a free port and a timeout.

    run = start_training(2, ["run_dir=...", ...], log=tmp_path / "a.log")   # in the background
    run.wait_for(lambda text: "step 3 |" in text); os.kill(run.rank_pid(1), signal.SIGUSR1)
    assert run.wait() == 85
    result = train(2, [...], log=...)                                       # start + wait

Each run gets its own process group (killed whole on timeout), OMP_NUM_THREADS=1 (ranks share the
cores), and the repository on PYTHONPATH. 1 rank uses `--num_nodes 1 --num_gpus 1`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_test.yaml"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


class Run:
    """A launcher process running in the background, its output going to `log`."""

    def __init__(self, cmd: list[str], log: Path, env: dict, timeout: float):
        self.cmd, self.log, self.deadline = cmd, Path(log), time.monotonic() + timeout
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        try:
            rc = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            raise AssertionError(f"timed out: {' '.join(self.cmd)}\n--- log ---\n{self.text()[-6000:]}") from None
        finally:
            self._out.close()
        return rc

    def wait_for(self, predicate, what: str = "condition", poll: float = 0.2):
        """Poll until predicate(log text) is truthy (returns it) or the run ends / times out."""
        while time.monotonic() < self.deadline:
            got = predicate(self.text())
            if got:
                return got
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (exit {self.proc.returncode}) before {what}:\n{self.text()[-6000:]}")
            time.sleep(poll)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-6000:]}")

    def rank_pid(self, rank: int) -> int:
        """The pid of a rank, from the launcher's 'process N spawned with command: [... --local_rank=R ...]'."""

        def find(text):
            m = re.search(rf"process (\d+) spawned with command: \[[^\]]*'--local_rank={rank}'", text)
            return int(m.group(1)) if m else None

        return self.wait_for(find, f"rank {rank} to start")


def training_command(
    ranks: int, overrides: list[str], config: Path = TINY, module: str = "ditscale.train", check: bool = False
) -> list[str]:
    launcher = [
        str(DEEPSPEED),
        "--num_nodes",
        "1",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "--module",
        module,
    ]
    return launcher + ["--config", str(config), *overrides] + (["--check"] if check else [])


def start_training(
    ranks: int, overrides: list[str], log: Path, env: dict | None = None, timeout: float = 600, config: Path = TINY
) -> Run:
    return Run(training_command(ranks, overrides, config), log, child_env(env), timeout)


@dataclass
class Result:
    returncode: int
    output: str
    log: Path


def train(
    ranks: int, overrides: list[str], log: Path, env: dict | None = None, timeout: float = 600, config: Path = TINY
) -> Result:
    run = start_training(ranks, overrides, log, env, timeout, config)
    rc = run.wait()
    return Result(rc, run.text(), run.log)


def metrics(run_dir: str | Path) -> dict[int, dict]:
    """Per-step records of run_dir/metrics.jsonl (the last one written for a step wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


# The shared reference run: 2 ranks, TOTAL steps, checkpoints at N and 2N (and TOTAL), one log line per
# step. 64 samples at global batch 8 make an epoch of 8 steps: N resumes mid-epoch, the runs cross epochs.
# Under ZeRO-3 the EMA decay is 0: the EMA is then the fp32 master copy, which checks our shard mapping
# of ZeRO-3 partitions against DeepSpeed's own consolidation (test_export.py); and every block is
# activation-checkpointed (recomputation under ZeRO-3's parameter gathering).
N, TOTAL = 5, 12
STAGE_EXTRA = {3: ["train.ema_decay=0.0", "model.checkpoint_every=1"]}


def ds_config(stage: int) -> str:
    """The reference runs' DeepSpeed JSON: bf16 for ZeRO-1/2/3; stage 0 is fp32 only."""
    return "ds_configs/zero0_fp32_cpu.json" if stage == 0 else f"ds_configs/zero{stage}_bf16.json"


def reference_overrides(stage: int, run_dir: str | Path, data: str, *extra: str) -> list[str]:
    return [
        f"engine.ds_config={ds_config(stage)}",
        f"data.root={data}",
        f"run_dir={run_dir}",
        f"train.max_steps={TOTAL}",
        f"train.ckpt_every={N}",
        "train.keep_last=4",
        *STAGE_EXTRA.get(stage, []),
        *extra,
    ]


def ckpt(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "ckpt" / f"step_{step:08d}"


def tensor_leaves(obj, path=""):
    """(path, tensor) of every tensor inside nested dicts / lists (a checkpoint file's contents)."""
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from tensor_leaves(obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensor_leaves(v, f"{path}/{i}")
