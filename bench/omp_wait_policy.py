"""OpenMP threads that spin vs sleep at barriers, on an idle machine and beside one busy core.

    python bench/omp_wait_policy.py [--steps 200]

Builds the tiny base (its pretraining shortened to --steps) in a fresh process with two torch
threads, four ways, side by side in one run: OMP_WAIT_POLICY unset (GNU OpenMP spins) or
PASSIVE (what `dipnet` sets when other processes keep a core busy), each on an idle machine and
beside a busy loop pinned to core 0 (another job on a shared node). Prints the wall times, the ratios, and whether every
build wrote the same weights (the wait policy must not move numerics). Each build runs once per
condition, the conditions interleaved, so drift in the host's speed falls on both policies alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILD = r"""
import hashlib, sys, time
from pathlib import Path
import torch
torch.set_num_threads(2)
from dipnet.pipeline.base_model import build_tiny_base
from dipnet.pipeline.recipe import TinyBaseSettings
out = Path(sys.argv[2])
t = time.perf_counter()
build_tiny_base(TinyBaseSettings(pretrain_steps=int(sys.argv[1])), out, seed=0, progress=False)
print(time.perf_counter() - t, hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16])
"""


def build(steps: int, policy: str | None, tmp: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = Path(tempfile.mkdtemp(dir=tmp)) / "base"
    res = subprocess.run([sys.executable, "-c", BUILD, str(steps), str(out)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"error: the build failed:\n{res.stderr[-2000:]}")
    seconds, digest = res.stdout.split()[-2:]
    return float(seconds), digest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="pretraining steps of the tiny base (560 in the real one)")
    args = ap.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        sys.exit("error: needs at least 2 cores (one to keep busy)")
    tmp = Path(tempfile.mkdtemp(prefix="dipnet-omp-"))
    times, digests = {}, set()
    for load in ("idle", "one core busy"):
        busy = None
        if load != "idle":
            busy = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
            time.sleep(1)
        try:
            for policy in (None, "PASSIVE"):
                s, d = build(args.steps, policy, tmp)
                times[load, policy] = s
                digests.add(d)
                print(f"  {load:14s} OMP_WAIT_POLICY={policy or 'unset':8s} {s:7.1f} s", flush=True)
        finally:
            if busy:
                busy.kill()
                busy.wait()
    print(f"\ntiny base, {args.steps} pretraining steps, 2 threads, {os.cpu_count()} cores:")
    for load in ("idle", "one core busy"):
        print(f"  {load:14s} PASSIVE / spinning: {times[load, 'PASSIVE'] / times[load, None]:.2f}x the time")
    print(f"  spinning, busy / idle: {times['one core busy', None] / times['idle', None]:.2f}x; "
          f"PASSIVE, busy / idle: {times['one core busy', 'PASSIVE'] / times['idle', 'PASSIVE']:.2f}x")
    print(f"  weights identical across all four builds: {len(digests) == 1}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
