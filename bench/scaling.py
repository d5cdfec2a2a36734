"""How training cost grows: step time and tokens/s vs model size, vs ranks, vs DIP trajectories m.

- size and m: one process, the same batch (4 x 128 tokens), full fine-tuning with AdamW, on the
  tiny base (1M), a 25M Llama and SmolLM2-135M (the real pretrained model); sft, dip m=1, 2, 4
  timed round-robin (every round times every variant, so noise hits them alike), medians.
- ranks: the real training entry point (DeepSpeed ZeRO-2, gloo) on the 25M Llama with 1 rank
  (both cores) and 2 ranks (one core each), the same global batch, tokens/s after warm-up.

    python bench/scaling.py [--rounds 3] [--out bench/scaling.png]

Prints the tables and writes one PNG with three panels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BATCH, SEQ = 4, 128


def build_models(tmp: Path):
    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.pretrained import pretrained_base
    from dipnet.pipeline.recipe import TinyBaseSettings
    from eval_throughput import make_25m

    tiny = tiny_base(TinyBaseSettings(), progress=False)
    yield "tiny (1M)", tiny
    yield "llama-25M", make_25m(tmp, tiny)
    try:
        yield "SmolLM2-135M", pretrained_base("smollm2-135m-instruct", progress=False)
    except Exception as exc:  # no registry: say so and go on
        print(f"SmolLM2-135M skipped: {exc}")


def time_sizes_and_m(rounds: int, steps: int, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from dipnet.pipeline import dip

    variants = {"sft": ("mean", 1), "dip m=1": ("sample", 1), "dip m=2": ("sample", 2), "dip m=4": ("sample", 4)}
    out = {}
    for name, path in build_models(tmp):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        dip.attach_dip(model, dip.DipConfig(method="dip", init_variance=3e-3))
        model.config.use_cache = False
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(3, model.config.vocab_size, (BATCH, SEQ), generator=g)

        def step(mode, m, model=model, opt=opt, x=x):
            dip.set_dip_mode(model, mode)
            b = dip.repeat_for_trajectories({"input_ids": x}, m)["input_ids"]
            loss = dip.dip_objective(model(input_ids=b).logits, b, m, model, 1e-2, 1e-4, 0.0)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times = {v: [] for v in variants}
        for mode, m in variants.values():  # warm-up, not timed
            step(mode, m)
        for _ in range(rounds):
            for v, (mode, m) in variants.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(mode, m)
                times[v].append((time.perf_counter() - t0) / steps)
        med = {v: statistics.median(t) for v, t in times.items()}
        out[name] = {"params": n_params, "step_s": med, "spread": {v: [min(t), max(t)] for v, t in times.items()}}
        print(f"  {name:14s} {n_params / 1e6:7.1f}M  " + "  ".join(
            f"{v} {med[v]:.3f}s ({med[v] / med['sft']:.2f}x)" for v in variants), flush=True)
        del model, opt
    return out


def time_ranks(tmp: Path, steps: int = 24, warm: int = 4) -> dict:
    from dipnet.launch import local as launch
    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.data import preprocess
    from dipnet.pipeline.recipe import Recipe, TinyBaseSettings, apply_overrides
    from eval_throughput import make_25m

    base = tmp / "llama25m" if (tmp / "llama25m").is_dir() else make_25m(tmp, tiny_base(TinyBaseSettings(), progress=False))
    out = {}
    for procs in (1, 2):
        r = Recipe.model_validate(apply_overrides({}, {
            "data.max_length": SEQ, "train.method": "full", "train.global_batch_size": 8, "train.micro_batch_size": 8 // procs,
            "train.max_steps": steps, "train.warmup_steps": 1, "train.zero_stage": 2, "train.save_every": 10_000,
            "train.log_every": warm, "dip.method": "none",
            "launch.launcher": "single" if procs == 1 else "deepspeed"}))
        data = preprocess(r.data, base, tmp / "pre")["path"]
        d = tmp / f"ranks{procs}"
        d.mkdir()
        (d / "recipe.json").write_text(json.dumps(r.to_dict()))
        port = launch.choose_master_port(None)
        cmd = launch.train_command(r.launch, procs, port, ["--recipe", str(d / "recipe.json"), "--model", str(base),
                                                          "--data", data, "--out", str(d)])
        env = launch.rank_env(procs, port)  # threads per rank = cores / ranks
        launch.run_ranks(cmd, env, d / "train.log", 1800, single=procs == 1, port=port)
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        a, b = next(x for x in rows if x["step"] == warm), rows[-1]
        tps = (b["tokens_seen"] - a["tokens_seen"]) / (b["wall_s"] - a["wall_s"])
        out[procs] = tps
        print(f"  {procs} rank(s): {tps:8.0f} tokens/s", flush=True)
    return out


def plot(sizes: dict, ranks: dict, path: Path) -> None:
    from dipnet.pipeline.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    names = list(sizes)
    params = [sizes[n]["params"] / 1e6 for n in names]
    for v in ("sft", "dip m=1", "dip m=2", "dip m=4"):
        ax[0].plot(params, [sizes[n]["step_s"][v] for n in names], marker="o", label=v)
    ax[0].set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel=f"step time (s), batch {BATCH}x{SEQ}",
              title="step time vs model size")
    ax[0].legend()
    for n in names:
        ax[1].plot([1, 2, 4], [sizes[n]["step_s"][f"dip m={m}"] / sizes[n]["step_s"]["sft"] for m in (1, 2, 4)],
                   marker="o", label=n)
    ax[1].plot([1, 2, 4], [1, 2, 4], ls="--", c="gray", label="m x sft")
    ax[1].set(xlabel="trajectories m", ylabel="step time / sft", title="DIP cost vs m")
    ax[1].legend()
    ax[2].bar([str(k) for k in ranks], list(ranks.values()), color="tab:blue")
    ax[2].set(xlabel="ranks (2 cores in all)", ylabel="tokens/s", title="llama-25M, ZeRO-2, same global batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--out", default=str(HERE / "scaling.png"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"machine: CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="dipnet-scaling-"))
    try:
        print(f"step time vs model size and m (one process, batch {BATCH} x {SEQ}, {args.rounds} rounds):")
        sizes = time_sizes_and_m(args.rounds, args.steps, tmp)
        print("tokens/s vs ranks (dipnet's training entry point):")
        ranks = time_ranks(tmp)
        print(f"2 ranks / 1 rank: {ranks[2] / ranks[1]:.2f}x")
        plot(sizes, ranks, Path(args.out))
        print(f"plot: {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
