"""Gradient checkpointing (`train.gradient_checkpointing`): activation memory and step time, with
and without it, for sft and DIP at m = 1 and 2 trajectories.

Activation memory is counted device-independently: the bytes of every tensor autograd saves for
backward (`torch.autograd.graph.saved_tensors_hooks`), weights excluded. Step time is one
forward + backward, interleaved round-robin (each round times every variant) so machine noise hits
all alike; medians and ratios are printed side by side.

    python bench/grad_checkpointing.py                 # CPU: a ~25M Llama, 8 x 256 tokens
    python bench/grad_checkpointing.py --model tiny    # the embedded tiny base
    python bench/grad_checkpointing.py --device cuda --model 125m

Expected: activations fall to about one block input per layer (plus the output layer's), step time
rises by about one more forward (~1.3x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(kind: str, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if kind == "tiny":
        from dipnet.pipeline.base_model import tiny_base
        from dipnet.pipeline.recipe import TinyBaseSettings

        return LlamaForCausalLM.from_pretrained(tiny_base(TinyBaseSettings(), progress=False)).to(device), 128
    size = {"25m": (512, 1376, 8, 8), "125m": (768, 2048, 12, 12)}[kind]
    cfg = LlamaConfig(vocab_size=32000 if kind == "125m" else 512, hidden_size=size[0], intermediate_size=size[1],
                      num_hidden_layers=size[2], num_attention_heads=size[3], num_key_value_heads=size[3],
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).to(device), 256 if kind == "25m" else 512


def variant(kind: str, device, method: str, m: int, ckpt: bool):
    from dipnet.pipeline import dip

    torch.manual_seed(0)
    model, seq = build(kind, device)
    if method == "dip":
        dip.attach_dip(model, dip.DipConfig(method="dip", init_variance=3e-3))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model, seq


def step(model, batch) -> int:
    """One forward + backward; returns the bytes autograd saved for backward (weights excluded)."""
    weights = {p.data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t):
        nonlocal saved
        if t.data_ptr() not in weights:
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="25m", choices=["tiny", "25m", "125m"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    names = [(method, m, ckpt) for method, m in (("sft", 1), ("dip", 1), ("dip", 2)) for ckpt in (False, True)]
    models = {n: variant(args.model, device, n[0], n[1], n[2]) for n in names}
    seq = next(iter(models.values()))[1]
    gen = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values()))[0].config.vocab_size
    base = torch.randint(3, vocab, (args.batch, seq), generator=gen).to(device)
    times = {n: [] for n in names}
    saved = {}
    for n in names:  # warm-up, and the memory count (the same every step)
        saved[n] = step(models[n][0], base.repeat(n[1], 1))
    for _ in range(args.rounds):
        for n in names:
            batch = base.repeat(n[1], 1)  # m trajectories: the batch stacked m times, as in training
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(models[n][0], batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t0)
    print(f"model {args.model}, batch {args.batch} x {seq} tokens, {args.device}, median of {args.rounds} rounds")
    print(f"{'variant':14s} {'activations MiB':>16s} {'step s':>8s} {'memory ckpt/plain':>18s} {'time ckpt/plain':>16s}")
    for method, m, ckpt in names:
        med = statistics.median(times[(method, m, ckpt)])
        row = f"{method} m={m} {'ckpt' if ckpt else 'plain':5s} {saved[(method, m, ckpt)] / 2**20:16.1f} {med:8.3f}"
        if ckpt:
            plain = (method, m, False)
            row += (f" {saved[(method, m, ckpt)] / saved[plain]:18.3f}"
                    f" {med / statistics.median(times[plain]):16.2f}")
        print(row)


if __name__ == "__main__":
    main()
