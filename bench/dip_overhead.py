"""DIP's training overhead: forward+backward step time and peak memory, sft vs dip (m = 1, 2, 4).

Measured side by side in one process, interleaved round-robin (each round times every variant)
so machine noise hits all variants alike; prints medians and ratios to sft.

    python bench/dip_overhead.py                       # CPU: tiny base and a ~25M Llama
    python bench/dip_overhead.py --device cuda         # GPU: bf16, a ~125M Llama at seq 512

Target: dip m=1 <= 1.05x sft step time; m trajectories <= 1.05*m x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(kind: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if kind == "tiny":
        from dipnet.pipeline.base_model import tiny_base
        from dipnet.pipeline.recipe import TinyBaseSettings

        return LlamaForCausalLM.from_pretrained(tiny_base(TinyBaseSettings(), progress=False)).to(device, dtype), 96, 8
    if kind == "25m":
        cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
        return LlamaForCausalLM(cfg).to(device, dtype), 128, 8
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).to(device, dtype), 512, 8


def peak_mem_mb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")


def saved_activation_mb(fn) -> float:
    """Bytes autograd saves for backward during fn() (deduplicated by storage): the memory a
    training step holds beyond weights and optimizer state, exact on any device."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=None, help="comma list of tiny,25m,125m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    args = ap.parse_args(argv)
    from dipnet.pipeline import dip

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(torch.get_num_threads())
    models = (args.models or ("125m" if device.type == "cuda" else "tiny,25m")).split(",")
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), dtype {dtype}, "
          f"threads {torch.get_num_threads()}")
    for kind in models:
        model, seq, batch = build(kind, device, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        dip.attach_dip(model, dip.DipConfig(method="dip", init_variance=1e-2))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(3, model.config.vocab_size, (batch, seq), device=device)
        variants = {"sft": ("mean", 1), "dip m=1": ("sample", 1), "dip m=2": ("sample", 2), "dip m=4": ("sample", 4)}
        times = {v: [] for v in variants}
        mems = {}

        def step(mode, m, model=model, opt=opt):
            dip.set_dip_mode(model, mode)
            b = dip.repeat_for_trajectories({"input_ids": x}, m)["input_ids"]
            saved = {}

            def fwd():
                out = model(input_ids=b)
                saved["loss"] = dip.dip_objective(out.logits, b, m, model, 1e-3, 1e-5, 0.0)["loss"]

            saved["mb"] = saved_activation_mb(fwd)
            opt.zero_grad(set_to_none=True)
            saved["loss"].backward()
            opt.step()
            return saved["mb"]

        acts = {name: step(mode, m) for name, (mode, m) in variants.items()}  # warm-up; saved activations
        for _ in range(args.rounds):
            for name, (mode, m) in variants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(mode, m)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / args.steps)
                mems[name] = peak_mem_mb(device)
        base = statistics.median(times["sft"])
        print(f"\n{kind}: {n_params / 1e6:.1f}M parameters, batch {batch} x {seq} tokens, "
              f"{args.rounds} rounds x {args.steps} steps")
        print(f"{'variant':10s} {'step (ms)':>10s} {'x sft':>7s} {'target':>8s} {'activations MB':>15s} "
              f"{'x sft':>6s} {'peak MB (GPU)':>14s}")
        for name, (mode, m) in variants.items():
            med = statistics.median(times[name])
            target = 1.05 * m
            print(f"{name:10s} {med * 1000:10.1f} {med / base:7.2f} {'<=' + format(target, '.2f'):>8s} "
                  f"{acts[name]:15.1f} {acts[name] / acts['sft']:6.2f} {mems[name]:14.0f}")
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
