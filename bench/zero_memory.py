"""Per-rank memory and step time at ZeRO-0/1/2/3 with 2 ranks on a ~25M-parameter Llama.

Each stage runs as its own 2-rank deepspeed launch (so peak RSS is per stage), one after
another in this run; printed as ratios to ZeRO-0. "state" is what a rank holds of parameters,
fp32 master copies and optimizer moments, counted from the tensors themselves (deduplicated by
storage); "peak RSS" is the process high-water mark, which also holds the libraries and the
activations.

    python bench/zero_memory.py          # target: ZeRO-3 state <= 0.6x ZeRO-0
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(stage: int, out: str, steps: int) -> None:
    import importlib
    import resource

    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # see pipeline/train.py
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    from dipnet.launch.ds_config import build_ds_config
    from dipnet.pipeline.recipe import TrainSettings

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    ds = build_ds_config(TrainSettings(zero_stage=stage, micro_batch_size=4), torch.distributed.get_world_size())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    x = torch.randint(3, 512, (4, 128), generator=torch.Generator().manual_seed(rank))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if i:
            times.append(time.perf_counter() - t0)

    seen, state = set(), 0

    def count(t):
        nonlocal state
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            state += t.untyped_storage().nbytes()

    for p in engine.module.parameters():
        count(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    base = getattr(opt, "optimizer", opt)
    for g in base.param_groups:
        for p in g["params"]:
            count(p.data)
    for s in base.state.values():
        for v in s.values():
            count(v)
    times.sort()
    res = {"stage": stage, "rank": rank, "params": n_params, "state_mb": state / 2**20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "step_ms": 1000 * times[len(times) // 2]}
    Path(out, f"s{stage}-r{rank}.json").write_text(json.dumps(res))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    from dipnet.launch.local import free_port, rank_env

    out = tempfile.mkdtemp(prefix="zero-bench-")
    ds = str(Path(sys.executable).parent / "deepspeed")
    for stage in (0, 1, 2, 3):
        port = free_port()
        env = {**rank_env(2, port), "ZERO_BENCH_WORKER": f"{stage}:{out}:{args.steps}"}
        res = subprocess.run([ds, "--num_gpus", "2", "--master_port", str(port), __file__], env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"ZeRO-{stage} run failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    rows = {s: [json.loads(Path(out, f"s{s}-r{r}.json").read_text()) for r in (0, 1)] for s in (0, 1, 2, 3)}
    z0 = rows[0][0]
    print(f"~{z0['params'] / 1e6:.1f}M-parameter Llama, 2 ranks (gloo, CPU), fp32, AdamW, {args.steps} timed steps")
    print(f"{'stage':6s} {'state/rank MB':>14s} {'x ZeRO-0':>9s} {'peak RSS MB':>12s} {'x ZeRO-0':>9s} {'step ms':>8s} {'x ZeRO-0':>9s}")
    for s, (r0, r1) in rows.items():
        st = max(r0["state_mb"], r1["state_mb"])
        rss = max(r0["peak_rss_mb"], r1["peak_rss_mb"])
        ms = max(r0["step_ms"], r1["step_ms"])
        st0 = max(x["state_mb"] for x in rows[0])
        rss0 = max(x["peak_rss_mb"] for x in rows[0])
        ms0 = max(x["step_ms"] for x in rows[0])
        print(f"ZeRO-{s} {st:14.1f} {st / st0:9.2f} {rss:12.0f} {rss / rss0:9.2f} {ms:8.1f} {ms / ms0:9.2f}")
    print("target: ZeRO-3 state per rank <= 0.60x ZeRO-0")


if __name__ == "__main__":
    spec = os.environ.get("ZERO_BENCH_WORKER")
    if spec:
        s, o, n = spec.split(":")
        worker(int(s), o, int(n))
    else:
        main()
