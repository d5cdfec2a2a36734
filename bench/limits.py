"""How close training and decoding come to this machine's limits, ours and the peers' side by side.

Measured in one run, in this order:
1. **Peaks.** Matrix-multiply throughput with all cores, through `torch.nn.functional.linear` (the op
   every projection of the models runs), on the shapes of SmolLM2-135M's and the 25M Llama's layers
   (512 tokens = a micro-batch of 2 x 256), fp32 and bf16; the peak is the best shape. Memory
   bandwidth: a 512 MiB read (sum) and copy.
2. **Training model-FLOP utilisation** (MFU): tokens/s of ours and of transformers.Trainer (both
   DeepSpeed ZeRO-2, 2 ranks, as bench/train_vs_hf_trainer.py runs them) times the FLOPs one token
   needs, over the peak of the same precision. FLOPs per token, N = the weights of every matmul
   (nn.Linear, lm_head once; an embedding lookup costs none), L layers, d = heads x head dim,
   T = sequence length, causal attention counted as the half of the T x T products it needs:
     full fine-tuning: 6N + 6LdT   (forward 2N + 2LdT; backward 4N + 4LdT)
     LoRA:             4N + 6 N_lora + 6LdT  (frozen weights need input gradients only: no 2N weight-gradient pass)
3. **Decode against the roofline**: vLLM and transformers `generate`, greedy, EOS ignored, at
   batch 1 and 64. One decode step reads every weight once plus each sequence's KV cache and does
   2N FLOPs per sequence; the bound is max(bytes / read bandwidth, FLOPs / peak) per step. The time
   of a step is (time for G+1 new tokens - time for 1) / G, so prefill is excluded.

    python bench/limits.py                       # all three, 25M (full) and SmolLM2-135M (LoRA)
    python bench/limits.py --train-models smollm2 --smollm2-method full --skip-decode
    python bench/limits.py --train-models 25m --train-variants ours --precision fp32,bf16 --steps 2,4 --skip-decode
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (tokens, in, out) of each projection: 512 tokens, SmolLM2-135M (q/o, k/v, gate/up, down, lm_head)
# and the 25M Llama (q/k/v/o, gate/up, down).
SHAPES = [(512, 576, 576), (512, 576, 192), (512, 576, 1536), (512, 1536, 576), (512, 576, 49152),
          (512, 512, 512), (512, 512, 1376), (512, 1376, 512)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_flags() -> str:
    from dipnet.pipeline.env import cpu_flags as all_flags

    wanted = sorted(f for f in all_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return " ".join(wanted) or "unknown"


def timed(fn, min_s: float = 0.4) -> float:
    """Seconds per call: two warm-up calls, then as many as fit in min_s (at least 2)."""
    fn(), fn()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def matmul_peaks(precisions: list[str], rounds: int = 3) -> dict[str, float]:
    """GFLOP/s of F.linear per precision: the best of SHAPES over `rounds` interleaved rounds (a
    peak is the best the machine showed; between two runs on a shared host it moved 128 -> 155)."""
    peaks = {}
    for p in precisions:
        best = {}
        for _ in range(rounds if p == "fp32" else 1):
            for m, k, n in SHAPES:
                x, w = torch.randn(m, k, dtype=DTYPES[p]), torch.randn(n, k, dtype=DTYPES[p])
                gflops = 2 * m * k * n / timed(lambda: torch.nn.functional.linear(x, w), 0.3 if p == "fp32" else 0.1) / 1e9
                best[m, k, n] = max(best.get((m, k, n), 0.0), gflops)
        for (m, k, n), g in best.items():
            print(f"  linear {p} {m}x{k} -> {n:<6d} {g:7.1f} GFLOP/s", flush=True)
        peaks[p] = max(best.values())
    return peaks


def memory_bandwidth() -> tuple[float, float]:
    """GB/s: (read: a sum over 512 MiB, copy: read + write counted, as STREAM does)."""
    x = torch.ones(128 * 1024 * 1024)
    y = torch.empty_like(x)
    read = x.numel() * 4 / timed(lambda: x.sum(), 1.0) / 1e9
    copy = 2 * x.numel() * 4 / timed(lambda: y.copy_(x), 1.0) / 1e9
    return read, copy


def shape_of(model) -> dict:
    """Matmul weights (N), LoRA weights, layers, attention width d and KV width per layer."""
    cfg = model.config
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ("lora_A" in name or "lora_B" in name))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"N": sum(m.weight.numel() for m in linear) - lora, "N_lora": lora, "L": cfg.num_hidden_layers,
            "d": cfg.num_attention_heads * head_dim, "kv": 2 * cfg.num_key_value_heads * head_dim}


def flops_per_token(s: dict, T: int, method: str) -> float:
    attention = 6 * s["L"] * s["d"] * T
    if method == "lora":
        return 4 * s["N"] + 6 * s["N_lora"] + attention
    return 6 * s["N"] + attention


def training(kinds: list[str], precisions: list[str], peaks: dict, smollm2_method: str, tmp: Path,
             variants=("ours", "hf"), steps: tuple[int, int] | None = None) -> list[tuple]:
    import train_vs_hf_trainer as tvh

    from dipnet.pipeline.data import preprocess
    from dipnet.pipeline.model_setup import setup_model

    rows = []
    for kind in kinds:
        over, warm, timed_steps = tvh.MODELS[kind]
        warm, timed_steps = steps or (warm, timed_steps)
        method = over["train.method"] if kind == "25m" else smollm2_method
        base = tvh.model_dir(kind, tmp)
        for p in precisions:
            extra = {"train.method": method, "train.precision": p}
            shape = None
            for variant in variants:
                r = tvh.recipe_for(kind, variant, warm + timed_steps, {**extra, "train.log_every": warm})
                if shape is None:
                    shape = shape_of(setup_model(r, base, trust_remote_code=False)[0])
                data = preprocess(r.data, base, tmp / "pre")["path"]
                run = (tvh.run_hf if variant == "hf" else tvh.run_ours)(r, base, data, tmp / f"{kind}-{p}-{variant}")
                tps = run["tokens"] / run["seconds"]
                mfu = tps * flops_per_token(shape, r.data.max_length, method) / (peaks[p] * 1e9)
                label = f"{kind} {method} {p} {'ours' if variant == 'ours' else 'HF Trainer'}"
                rows.append((label, tps, mfu))
                print(f"  {label:34s} {tps:8.0f} tokens/s  MFU {mfu:6.1%}  ({run['steps']} steps, {run['seconds']:.1f} s)",
                      flush=True)
    return rows


def decode(precision: str, peaks: dict, read_bw: float, tmp: Path, batches=(1, 64), prompt_len: int = 32,
           new: int = 32) -> list[tuple]:
    """SmolLM2-135M: vLLM and transformers generate, decode step time vs the roofline."""
    from transformers import AutoModelForCausalLM

    from dipnet.eval.vllm_runner import VllmEngine
    from dipnet.pipeline.pretrained import pretrained_base

    d = pretrained_base("smollm2-135m-instruct", progress=False)
    dtype = DTYPES[precision]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    s = shape_of(model)
    elt = torch.finfo(dtype).bits // 8
    prompts = [[(7 * i + 13 * j) % 4000 + 100 for j in range(prompt_len)] for i in range(max(batches))]

    def bound(b: int) -> tuple[float, str]:
        ctx = prompt_len + new / 2  # mean context over the timed steps
        t_mem = (s["N"] + b * s["L"] * s["kv"] * ctx) * elt / (read_bw * 1e9)
        t_flop = b * 2 * s["N"] / (peaks[precision] * 1e9)
        return (b / t_mem, "bandwidth") if t_mem >= t_flop else (b / t_flop, "compute")

    def hf_time(b: int, n: int) -> float:
        ids = torch.tensor(prompts[:b])
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0

    rows = []
    print(f"  SmolLM2-135M {precision}: N = {s['N'] / 1e6:.1f}M matmul weights, {s['N'] * elt / 2**20:.0f} MiB read per step",
          flush=True)
    for b in batches:
        hf_time(b, 2)  # warm-up
        step = (min(hf_time(b, new + 1) for _ in range(2)) - min(hf_time(b, 1) for _ in range(2))) / new
        rows.append((f"transformers generate {precision}, batch {b}", b / step, *bound(b)))
        print(f"  {rows[-1][0]:40s} {b / step:8.0f} tokens/s", flush=True)
    del model
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = VllmEngine(d, tmp / "vllm", prompt_len + new + 8, dtype="float32" if precision == "fp32" else "bfloat16")
    try:
        def vllm_time(b: int, n: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
            t0 = time.perf_counter()
            engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:b]], params, use_tqdm=False)
            return time.perf_counter() - t0

        for b in batches:
            vllm_time(b, 2)
            step = (min(vllm_time(b, new + 1) for _ in range(2)) - min(vllm_time(b, 1) for _ in range(2))) / new
            rows.append((f"vLLM {precision}, batch {b}", b / step, *bound(b)))
            print(f"  {rows[-1][0]:40s} {b / step:8.0f} tokens/s", flush=True)
    finally:
        engine.close()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-models", default="25m,smollm2")
    ap.add_argument("--smollm2-method", default="lora", choices=["lora", "full"])
    ap.add_argument("--precision", default="fp32", help="comma list of training/decode precisions: fp32,bf16")
    ap.add_argument("--train-variants", default="ours,hf", help="ours, hf (transformers.Trainer) or both")
    ap.add_argument("--steps", help="WARM,TIMED training steps (default: bench/train_vs_hf_trainer.py's per model)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args(argv)
    precisions = args.precision.split(",")
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {os.cpu_count()} CPU cores ({cpu_flags()}), torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads for the peaks")
    peaks = matmul_peaks(sorted(set(precisions) | {"fp32"}))
    read_bw, copy_bw = memory_bandwidth()
    print(f"  memory: read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s\n", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="dipnet-limits-"))
    train_rows, decode_rows = [], []
    try:
        if not args.skip_train:
            steps = tuple(int(x) for x in args.steps.split(",")) if args.steps else None
            train_rows = training(args.train_models.split(","), precisions, peaks, args.smollm2_method, tmp,
                                  args.train_variants.split(","), steps)
        if not args.skip_decode:
            for p in precisions:
                decode_rows += decode(p, peaks, read_bw, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n== limits ==")
    print(" ".join(f"peak {p} {v:.1f} GFLOP/s" for p, v in peaks.items()) + f"; read {read_bw:.1f} GB/s")
    if train_rows:
        print(f"\n{'training (2 ranks, ZeRO-2)':36s} {'tokens/s':>9s} {'MFU':>7s}")
        for label, tps, mfu in train_rows:
            print(f"{label:36s} {tps:9.0f} {mfu:7.1%}")
    if decode_rows:
        print(f"\n{'decode, SmolLM2-135M':40s} {'tokens/s':>9s} {'bound':>9s} {'bound by':>10s} {'of bound':>9s}")
        for label, tps, b, by in decode_rows:
            print(f"{label:40s} {tps:9.0f} {b:9.0f} {by:>10s} {tps / b:9.1%}")


if __name__ == "__main__":
    main()
