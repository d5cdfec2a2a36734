"""Host memory per rank while loading a model for training: ZeRO-2 vs ZeRO-3 (deepspeed.zero.Init),
fp32 vs bf16, 2 ranks; Llamas of ~30M and ~120M parameters saved as safetensors.

Each mode and size is its own 2-rank deepspeed launch that loads the model exactly as
pipeline/train.py does (transformers' from_pretrained in the training dtype, under
HfDeepSpeedConfig for ZeRO-3), then builds the engine. Per rank it records the growth of the
process peak (ru_maxrss: private memory and the mmapped weight pages it touched) over loading,
and of private memory (USS) after loading and after deepspeed.initialize. Two sizes separate
fixed costs (libraries, ZeRO-3 buffers) from the cost per parameter: memory = a + b·N, and
b·N is what is extrapolated to 3B and 7B.

    python bench/load_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = [("zero2", "fp32"), ("zero2", "bf16"), ("zero3", "fp32"), ("zero3", "bf16")]


def worker(mode: str, precision: str, model_dir: str, out: str) -> None:
    import importlib
    import resource

    import deepspeed
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from dipnet.launch.ds_config import build_ds_config
    from dipnet.pipeline.recipe import TrainSettings

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # see pipeline/train.py
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    proc = psutil.Process()
    uss0, rss0 = proc.memory_full_info().uss, proc.memory_info().rss
    t = TrainSettings(zero_stage=3 if mode == "zero3" else 2, precision=precision, micro_batch_size=1)
    ds = build_ds_config(t, world)
    keep = None
    if mode == "zero3":
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)  # from_pretrained loads straight into partitions while alive
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    uss_load = proc.memory_full_info().uss
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    uss_init = proc.memory_full_info().uss
    Path(out, f"{mode}-{precision}-r{rank}.json").write_text(json.dumps({
        "params": n, "load_peak_mb": peak_load / 2**20, "load_uss_mb": (uss_load - uss0) / 2**20,
        "init_uss_mb": (uss_init - uss0) / 2**20}))
    del keep
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


SIZES = {"30M": dict(hidden_size=512, intermediate_size=1376), "120M": dict(hidden_size=1024, intermediate_size=2752)}


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dipnet.launch.local import free_port, rank_env

    work = Path(tempfile.mkdtemp(prefix="load-bench-"))
    ds = str(Path(sys.executable).parent / "deepspeed")
    rows = {}
    for size, shape in SIZES.items():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=8000, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                          max_position_embeddings=256, tie_word_embeddings=False, **shape)
        LlamaForCausalLM(cfg).save_pretrained(work / size, safe_serialization=True)
        for mode, prec in MODES:
            port = free_port()
            out = work / f"{size}-out"
            out.mkdir(exist_ok=True)
            env = {**rank_env(2, port), "LOAD_BENCH_WORKER": f"{mode}:{prec}:{work / size}:{out}"}
            res = subprocess.run([ds, "--num_gpus", "2", "--master_port", str(port), __file__], env=env,
                                 capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"{size} {mode} {prec} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
            rows[(size, mode, prec)] = [json.loads((out / f"{mode}-{prec}-r{r}.json").read_text()) for r in (0, 1)]
    (a, b) = SIZES
    print("2 ranks (gloo, CPU); per rank, worst of the two ranks, MB; slope = extra bytes per parameter "
          f"between the {a} and {b} models")
    print(f"{'mode':12s} {'metric':12s} {a:>8s} {b:>8s} {'B/param':>8s} {'3B':>8s} {'7B':>8s}")
    for mode, prec in MODES:
        for metric, label in (("load_peak_mb", "load peak"), ("load_uss_mb", "load private"),
                              ("init_uss_mb", "+engine")):
            v = {s: max(r[metric] for r in rows[(s, mode, prec)]) for s in SIZES}
            n = {s: rows[(s, mode, prec)][0]["params"] for s in SIZES}
            slope = (v[b] - v[a]) * 2**20 / (n[b] - n[a])
            print(f"{mode + ' ' + prec:12s} {label:12s} {v[a]:8.0f} {v[b]:8.0f} {slope:8.2f} "
                  f"{slope * 3e9 / 2**30:7.1f}G {slope * 7e9 / 2**30:7.1f}G")
    sizes = ", ".join(f"{s} = {rows[(s, *MODES[0])][0]['params'] / 1e6:.0f}M" for s in SIZES)
    print(f"models: {sizes}; '+engine' includes optimizer state, which on a GPU node lives on the GPU")


if __name__ == "__main__":
    spec = os.environ.get("LOAD_BENCH_WORKER")
    if spec:
        m, p, d, o = spec.split(":")
        worker(m, p, d, o)
    else:
        main()
