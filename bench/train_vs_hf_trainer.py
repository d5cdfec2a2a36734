"""Our training loop vs the Hugging Face Trainer with the same DeepSpeed config, 2 ranks.

Same model, preprocessed (packed) data, collation (dipnet's `collate`), micro-batch, accumulation, ZeRO
stage, precision and optimizer (torch AdamW, the client optimizer both hand to DeepSpeed), both
started with the deepspeed launcher. Variants per model: `ours` (dip.method none), `hf`
(transformers.Trainer + DeepSpeed on the same model object dipnet builds) and `ours+dip`
(DIP m=1). They run in rounds, each round in a rotated order, so machine noise hits all alike.

Tokens/s counts real (unpadded) tokens over all ranks, from the end of the warm-up steps to the
end of the last step: ours from `metrics.jsonl` (`wall_s`, `tokens_seen`), the Trainer's from a
callback (step end times) and its `training_step` (tokens in each micro-batch).

    python bench/train_vs_hf_trainer.py                       # 25M Llama (full) and SmolLM2-135M (LoRA)
    python bench/train_vs_hf_trainer.py --models 25m --rounds 3

Target: ours >= 1.0x the Trainer's tokens/s (goal 1.1x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = {
    # name: (recipe overrides, warm-up steps, timed steps)
    # Packed sequences (no padding): both loops then process exactly the same tokens per step,
    # whatever order their samplers draw (unpacked, 20 timed sequences differ in padding by chance).
    "25m": ({"data.train": "synthetic", "data.max_length": 128, "data.synthetic.n_train": 1200,
             "data.packing": True, "train.method": "full", "train.micro_batch_size": 8}, 3, 24),
    "smollm2": ({"data.max_length": 256, "data.packing": True, "train.method": "lora",
                 "train.micro_batch_size": 2}, 2, 6),
}


def recipe_for(kind: str, variant: str, steps: int, extra: dict | None = None):
    """`extra`: further recipe overrides (bench/limits.py sets train.method and train.precision)."""
    from dipnet.pipeline.recipe import Recipe, apply_overrides

    over, warm, _ = MODELS[kind]
    o = {**over, "train.max_steps": steps, "train.warmup_steps": 1, "train.lr": 1e-4, "train.zero_stage": 2,
         "train.save_every": 10_000, "train.log_every": warm, "launch.launcher": "deepspeed",
         "dip.method": "dip" if variant == "ours+dip" else "none", "dip.init_variance": 3e-3}
    if kind == "smollm2":
        from dipnet.eval.tasks import default_gsm8k_dir

        d = default_gsm8k_dir()
        if d is None:
            raise SystemExit("smollm2 needs GSM8K train.jsonl in ../shared/data/gsm8k (or pass --models 25m)")
        o["data.train"] = str(d / "train.jsonl")
    o.update(extra or {})
    return Recipe.model_validate(apply_overrides({}, o))


def model_dir(kind: str, tmp: Path) -> Path:
    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.recipe import TinyBaseSettings

    if kind == "25m":
        from eval_throughput import make_25m

        return make_25m(tmp, tiny_base(TinyBaseSettings(), progress=False))
    from dipnet.pipeline.pretrained import pretrained_base

    return pretrained_base("smollm2-135m-instruct", progress=False)


def run_ours(recipe, base: Path, data: str, out: Path) -> dict:
    from dipnet.launch import local as launch

    out.mkdir(parents=True)
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict()))
    port = launch.choose_master_port(None)
    cmd = launch.train_command(recipe.launch, 2, port, ["--recipe", str(out / "recipe.json"), "--model", str(base),
                                                        "--data", data, "--out", str(out)])
    launch.run_ranks(cmd, launch.rank_env(2, port), out / "train.log", 3600, port=port)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warm = recipe.train.log_every
    a = next(r for r in rows if r["step"] == warm)
    b = rows[-1]
    return {"tokens": b["tokens_seen"] - a["tokens_seen"], "seconds": b["wall_s"] - a["wall_s"], "steps": b["step"] - warm}


def run_hf(recipe, base: Path, data: str, out: Path) -> dict:
    from dipnet.launch import local as launch

    out.mkdir(parents=True)
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict()))
    port = launch.choose_master_port(None)
    ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    cmd = [ds, "--num_gpus", "2", "--master_port", str(port), str(Path(__file__).resolve()), "--hf-worker",
           str(out / "recipe.json"), str(base), data, str(out)]
    try:
        launch.run_ranks(cmd, launch.rank_env(2, port), out / "train.log", 3600, port=port)
    except Exception:
        print("\n".join((out / "train.log").read_text().splitlines()[-25:]))
        raise
    ranks = [json.loads((out / f"hf_rank{r}.json").read_text()) for r in (0, 1)]
    warm = recipe.train.log_every
    t = ranks[0]["step_end"]
    return {"tokens": sum(sum(r["tokens"][warm:]) for r in ranks), "seconds": t[-1] - t[warm - 1], "steps": len(t) - warm}


def hf_ds_config(t) -> dict:
    """Our ZeRO template as an HF user would pass it: "auto" values that the Trainer fills from its
    TrainingArguments (the same numbers ours fills from the recipe), CPU device settings as ours."""
    from dipnet.launch.ds_config import DEVICE_SETTINGS, template_path

    cfg = json.loads(template_path(t.zero_stage, t.offload).read_text())
    zero = cfg.get("zero_optimization", {})
    for k, v in DEVICE_SETTINGS["cpu"].items():
        if zero.get(k) == "auto":
            zero[k] = v
    return cfg


def hf_worker(recipe_path: str, base: str, data: str, out: str) -> None:
    """One rank of transformers.Trainer + DeepSpeed (started by the deepspeed launcher)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dipnet.pipeline.data import TokenizedExamples, collate
    from dipnet.pipeline.models import load_tokenizer
    from dipnet.pipeline.recipe import Recipe
    from dipnet.pipeline.model_setup import setup_model

    import deepspeed

    # The same process group as ours (gloo on CPU); the Trainer's accelerate state adopts it.
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    # With a DeepSpeed config, TrainingArguments builds accelerate's state without a backend, and
    # on a CPU-only rank accelerate then finds none and trains as world size 1 (DeepSpeed sees 2
    # and refuses the batch size): configure the state ourselves, as accelerate's docs allow.
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend=backend)
    recipe = Recipe.model_validate(json.loads(Path(recipe_path).read_text()))
    t = recipe.train
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(recipe.run.seed)
    pad = load_tokenizer(base).pad_token_id
    model, _ = setup_model(recipe, base, trust_remote_code=False)  # the same model object ours trains
    stats = {"tokens": [], "step_end": []}

    class Timed(Trainer):
        def training_step(self, model, inputs, *a, **k):
            stats["tokens"].append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **k)

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stats["step_end"].append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(Path(out) / "hf"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, max_steps=t.max_steps, learning_rate=t.lr,
        warmup_steps=t.warmup_steps, lr_scheduler_type="cosine", weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip, optim="adamw_torch", logging_steps=10_000, save_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        seed=recipe.run.seed, bf16=t.precision == "bf16",
        accelerator_config={"use_configured_state": True},
        deepspeed=hf_ds_config(t))
    if rank == 0:
        print(f"hf Trainer: world size {args.world_size}, micro {args.per_device_train_batch_size}, "
              f"accumulation {args.gradient_accumulation_steps}", flush=True)
    trainer = Timed(model=model, args=args, train_dataset=TokenizedExamples(data),
                    data_collator=lambda ex: collate(ex, pad), callbacks=[StepEnd()])
    trainer.train()
    (Path(out) / f"hf_rank{rank}.json").write_text(json.dumps(stats))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="25m,smollm2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="ours,hf,ours+dip")
    ap.add_argument("--hf-worker", nargs=4, metavar=("RECIPE", "BASE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args(argv)  # the launcher appends --local_rank
    if args.hf_worker:
        return hf_worker(*args.hf_worker)
    import torch

    from dipnet.pipeline.data import preprocess

    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, 2 ranks (gloo), ZeRO-2, fp32")
    variants = args.variants.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="dipnet-bench-"))
    try:
        for kind in args.models.split(","):
            _, warm, timed = MODELS[kind]
            base = model_dir(kind, tmp)
            results = {v: [] for v in variants}
            for rnd in range(args.rounds):
                order = variants[rnd % 3:] + variants[:rnd % 3]
                for v in order:
                    r = recipe_for(kind, v, warm + timed)
                    data = preprocess(r.data, base, tmp / "pre")["path"]
                    run = (run_hf if v == "hf" else run_ours)(r, base, data, tmp / f"{kind}-{v}-{rnd}")
                    results[v].append(run["tokens"] / run["seconds"])
                    print(f"  {kind} round {rnd} {v:9s} {run['tokens'] / run['seconds']:9.0f} tokens/s "
                          f"({run['steps']} steps, {run['seconds']:.1f} s)", flush=True)
            hf = statistics.median(results["hf"]) if results.get("hf") else float("nan")
            print(f"\n{kind}: median tokens/s over {args.rounds} rounds (warm-up {warm} steps excluded)")
            print(f"{'variant':10s} {'tokens/s':>10s} {'spread':>17s} {'x hf':>6s}")
            for v in variants:
                med = statistics.median(results[v])
                print(f"{v:10s} {med:10.0f} {min(results[v]):8.0f}-{max(results[v]):<8.0f} {med / hf:6.2f}")
            print(flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
