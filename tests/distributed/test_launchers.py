"""`python -m adl_cli pretrain` unchanged under torchrun and accelerate launch (2 CPU processes).

Both launches run at once (each mostly waits on process start-up). On a machine without
GPUs accelerate launch needs --multi_gpu to start several processes (it then launches
through torch.distributed.run, and adl forms a gloo group); --cpu alone would run one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist

LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29633", "-m", "adl_cli"],
    "accelerate": [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29634", "-m", "adl_cli",
    ],
}
SETS = ["train.steps=2", "train.checkpoint_every=0", "train.eval_batches=1", "sample_tokens=2"]


@pytest.fixture(scope="module")
def launched(dist_recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, cmd in LAUNCHERS.items():
        args = cmd + ["pretrain", str(dist_recipe), "--out", str(root / name), "--no-progress"]
        args += [a for s in SETS + [f"train.distributed={'fsdp' if name == 'accelerate' else 'ddp'}"] for a in ("--set", s)]
        procs[name] = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    out = {}
    for name, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            pytest.fail(f"{name} launch did not finish in 120 s")
        out[name] = (p.returncode, stdout, stderr)
    return root, out


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_pretrain_runs_unchanged_and_only_rank_0_prints(launched, launcher):
    root, out = launched
    rc, stdout, stderr = out[launcher]
    assert rc == 0, stderr[:3000] + "\n...\n" + stderr[-1500:]  # the head holds a child's own error, the tail the launcher's
    assert stdout.count("adl pretrain") == 1 and stdout.count("model:") == 1  # rank 1 stays quiet
    assert stdout.count("run summary") + stdout.count("adl run:") == 1
    summary = json.loads((root / launcher / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert summary["parallel"] == ("fsdp" if launcher == "accelerate" else "ddp")
    assert (root / launcher / "model.safetensors").exists()
