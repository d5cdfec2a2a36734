"""Distributed fine-tuning entry point (one process per rank), in the style of a torchtune recipe.

Started by the `train` stage through the deepspeed launcher, torchrun, or as one process:

    deepspeed --num_gpus 2 --module dipnet.pipeline.train --recipe RESOLVED.json --model MODEL_DIR \
        --data PREPROCESSED_DIR --out TRAIN_DIR
    deepspeed --num_gpus 2 --module dipnet.pipeline.train --runs RUNS.json --model ... --data ...   # a study's runs in one launch

Reads top to bottom: recipe -> distributed set-up -> tokenizer -> model (+ DIP, + LoRA) ->
data -> DeepSpeed engine -> resume -> loop -> save -> clean exit.

Outputs under --out: `checkpoints/step-NNNNNN/` (DeepSpeed checkpoint + trainer_state.json,
written under a temporary name and renamed when complete), `checkpoints/latest` (and
`checkpoints/best` with train.keep_best), `metrics.jsonl` (with `val_nll` where train.eval_every
validates), `tb/` (TensorBoard), `plots/*.png`, `train_summary.json`.
"""

from __future__ import annotations

import signal


class _StopRequest:
    """Set by SIGTERM/SIGINT/SIGUSR1; the loop finishes its step, saves and exits.

    Installed before anything heavy is imported (below): a preemption or time-limit signal that
    arrives while a rank is still starting must not kill it, or every restart could be cut
    down before its first step and the job would never progress."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            cls.requested = True

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, handler)


STOP = _StopRequest
if __name__ == "__main__":
    STOP.install()

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch

from dipnet.pipeline import dip as dipmod
from dipnet.pipeline.checkpoint import (CKPT_PREFIX, best_checkpoint, latest_checkpoint, latest_intact_checkpoint,
                                        read_trainer_state, save_checkpoint, to_universal, weights_only_torch_load)
from dipnet.pipeline.data import TokenizedExamples, batch_indices, collate, model_inputs
from dipnet.launch.ds_config import build_ds_config
from dipnet.pipeline.errors import DipnetError, RunError
from dipnet.pipeline.model_setup import build_optimizer, setup_model
from dipnet.pipeline.ops import use_private_extensions_dir
from dipnet.pipeline.recipe import Recipe

COLLECTIVE_TIMEOUT_S = 1800
STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; a rerun resumes


class Stopped(RunError):
    exit_code = STOPPED_EXIT




# ----------------------------------------------------------------------------- set-up helpers

def cuda_problem() -> str:
    """Why CUDA is unusable here, in words."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build; install the GPU stack (make install EXTRA=gpu)"
    try:
        torch.cuda.init()
    except Exception as exc:
        return " ".join(str(exc).split())[:200]
    return f"no GPU visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"


def setup_distributed(device: str = "auto", timeout_s: int = COLLECTIVE_TIMEOUT_S) -> tuple[int, int, int, bool]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world, local_rank, is_main).

    `device` is launch.device: `cuda` refuses to start without a usable GPU (a GPU job that
    silently trained on gloo and the CPU would take days and look like it worked)."""
    import importlib

    from dipnet.pipeline.env import import_deepspeed

    deepspeed = import_deepspeed()
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError(f"launch.device is cuda but CUDA is unusable here: {cuda_problem()}")

    # Not `import deepspeed.comm.torch as m`: that binds the attribute deepspeed.comm.torch,
    # which is the real `torch` package re-exported there.
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    if os.environ.get("DS_ACCELERATOR") == "cpu" and not os.environ.get("DIPNET_DS_SHM"):
        # DeepSpeed compiles a shared-memory all-reduce op at every cold start on CPU (20-55 s);
        # only inference all-reduce uses it. Training all-reduces go through gloo either way.
        ds_torch.build_shm_op = lambda: None
    if "RANK" not in os.environ:
        if "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
            # `srun -n N` (deepspeed --launcher slurm) starts every rank with only Slurm's view of it.
            os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
                              WORLD_SIZE=os.environ.get("SLURM_NTASKS", "1"))
        else:
            # Without a rank every process would train alone on GPU 0, N copies writing one directory.
            raise RunError("no RANK in the environment: start training through a launcher (deepspeed, torchrun, "
                           "srun) or launch.launcher: single")
    # Several nodes: gloo and NCCL talk over the interface that carries the node's Slurm address
    # unless launch.slurm.env chose one (a host name that resolves to loopback breaks the default).
    from dipnet.launch.slurm import node_socket_env

    chosen = node_socket_env()
    if chosen and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"node {os.environ.get('SLURMD_NODENAME', '?')}: gloo and NCCL over {chosen['GLOO_SOCKET_IFNAME']}, "
              "the interface holding its Slurm address", flush=True)
    os.environ.update(chosen)
    # Stated, not inherited (torch's NCCL default moved from 30 to 10 min between releases): a rank
    # whose peer hangs or whose node died gives up after this (launch.collective_timeout_s; under
    # Slurm the controller usually ends the job first, SlurmdTimeout after the node stops
    # answering). Waits that can be longer (rank 0 converting a 7B checkpoint to the universal
    # format) happen on the file system, not in a collective.
    # The groups DeepSpeed creates after this (ZeRO's data-parallel groups, where the gradient
    # reductions run) take torch's module default, not the world group's timeout: measured, a rank
    # whose peer hung waited past a 10 s setting for the whole 10-minute test limit. So the
    # default is set too, before any group exists.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               timeout=timedelta(seconds=timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, world, local_rank, rank == 0


# Post-processing some families apply after the vocabulary projection (Gemma 2's soft-capping,
# Cohere's and Granite's logit scales): with any of them set, logits come from the model itself.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def next_token_logprobs(forward, batch: dict, output_layer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each counted next token [N, T-1] (0 where not counted) and the mask.

    With `output_layer` (the model's vocabulary projection) logits are computed only where a
    label counts: the model returns its last hidden state (and logits for one position), and the
    projection runs on the counted positions alone. The HF Trainer computes logits everywhere; on
    GSM8K SFT a third of the positions are prompt tokens that never count, and SmolLM2's 49k-word
    projection is a fifth of its compute (measured: 9% less time per micro-batch).
    `counted_logits_are_exact` decides whether a model allows it."""
    if output_layer is None:
        logits = forward(**model_inputs(batch)).logits
        return dipmod.token_logprobs(logits, batch["labels"])
    out = forward(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
    target = batch["labels"][:, 1:]
    mask = target != -100
    lp = dipmod.target_logprobs(output_layer(out.hidden_states[-1][:, :-1][mask]), target[mask])
    return torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp), mask


def counted_logits_are_exact(forward, module, batch: dict, world: int) -> bool:
    """Whether the model's logits are its output layer applied to its last hidden state, checked
    on one real batch in one forward (so DIP noise and dropout are the same for both), and agreed
    by every rank (ranks that ran different forwards would desynchronise ZeRO-3's gathers)."""
    layer = None if any(getattr(module.config, a, None) for a in LOGIT_TRANSFORMS) else module.get_output_embeddings()
    ok = False
    if layer is not None:
        with torch.no_grad():
            try:  # logits_to_keep = every position: also checks the model accepts the argument
                out = forward(**model_inputs(batch), output_hidden_states=True,
                              logits_to_keep=batch["input_ids"].shape[1])
            except TypeError:
                out = None
            if getattr(out, "hidden_states", None) is not None and out.logits.shape[:2] == batch["input_ids"].shape:
                full = out.logits.float()
                half = out.logits.dtype in (torch.bfloat16, torch.float16)  # rounding of a 16-bit matmul
                tol = (2e-2 if half else 1e-4) * (1 + full.abs().max())
                ok = bool((layer(out.hidden_states[-1]).float() - full).abs().max() <= tol)
    flag = torch.tensor([float(ok)], device=next(module.parameters()).device)
    if world > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def validation_stats(engine, examples, micro: int, rank: int, world: int, pad: int, device,
                     output_layer=None) -> dict:
    """Answer NLL and greedy token accuracy on the validation examples, DIP (and any noise) on
    its mean path, dropout off. Each rank scores its share; every rank runs the same number of
    forwards (a rank out of examples runs one it does not count), as ZeRO-3's gathers need."""
    module = engine.module
    dipmod.set_dip_mode(module, "mean")
    engine.eval()
    share = math.ceil(len(examples) / world)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, correct
    with torch.no_grad():
        for start in range(0, share, micro):
            idx = [rank * share + i for i in range(start, min(start + micro, share))]
            real = [i for i in idx if i < len(examples)]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in (real or [0])], pad).items()}
            target = batch["labels"][:, 1:]
            mask = target != -100
            if output_layer is not None:
                out = engine(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
                logits = output_layer(out.hidden_states[-1][:, :-1][mask]).float()
            else:
                logits = engine(**model_inputs(batch)).logits[:, :-1][mask].float()
            if real:
                tgt = target[mask]
                sums += torch.stack([torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"),
                                     mask.sum(), (logits.argmax(-1) == tgt).sum()]).to(torch.float64)
    torch.distributed.all_reduce(sums)
    engine.train()
    dipmod.set_dip_mode(module, "sample")
    n = max(sums[1].item(), 1.0)
    return {"val_nll": sums[0].item() / n, "val_token_acc": sums[2].item() / n}


def validation_tracking(state: dict) -> dict:
    """The validation bookkeeping a checkpoint carries (best step and NLL, validations since):
    known keys with finite numbers only, since trainer_state.json may have been edited."""
    saved = state.get("validation") if isinstance(state.get("validation"), dict) else {}
    return {k: v for k, v in saved.items() if k in ("best_step", "best_val_nll", "since_best", "stopped_early_at")
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def sam_perturb(module, loss_fn, rho: float, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SAM's ascent (Foret et al. 2021): w ← w + ρ·g/‖g‖ with g the gradient of this micro-batch's
    loss (`loss_fn()`: a forward of this micro-batch), averaged over ranks so every replica moves the same way. Returns (param, saved value)
    pairs for `sam_restore`. The gradient is taken with autograd directly, outside DeepSpeed's
    buffers, so the engine's own backward afterwards sees only the perturbed point's gradient.
    Needs whole weights on every rank: ZeRO 0-2 (the recipe refuses ZeRO-3)."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])
    if world > 1:
        torch.distributed.all_reduce(flat)
        flat /= world
    scale = rho / (flat.norm() + 1e-12)
    saved, offset = [], 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            saved.append((p, p.detach().clone()))
            p.add_((flat[offset:offset + n] * scale).view_as(p).to(p.dtype))
            offset += n
    return saved


# SAM holds, per rank and beyond ZeRO's share, a flat float32 gradient of every trainable
# parameter, the copy of the weights it restores and autograd's gradients: ~10 bytes per
# trainable parameter in bf16 (a 7B full fine-tune: ~70 GB on every GPU). Above this it is refused;
# LoRA's adapters (a few million parameters) are far below it at any model size.
SAM_MAX_TRAINABLE = 2_000_000_000


def check_sam_size(trainable_parameters: int) -> None:
    if trainable_parameters > SAM_MAX_TRAINABLE:
        raise RunError(f"train.optimizer sam: {trainable_parameters / 1e9:.1f}B trainable parameters; SAM keeps ~10 "
                       f"bytes per trainable parameter on every rank beyond ZeRO's share (limit "
                       f"{SAM_MAX_TRAINABLE / 1e9:.0f}B): use train.method lora, or optimizer adamw")


def sam_restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for p, value in saved:
            p.copy_(value)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def grad_accum(train, world: int) -> int:
    """Micro steps per optimizer step: from train.global_batch_size when set (so 2 and 16 ranks
    take the same optimizer steps over the same examples), else train.grad_accum."""
    if train.global_batch_size is None:
        return train.grad_accum
    per = train.micro_batch_size * world
    if train.global_batch_size % per:
        raise RunError(f"train.global_batch_size {train.global_batch_size} is not a multiple of "
                       f"train.micro_batch_size {train.micro_batch_size} x {world} ranks; choose one that is")
    return train.global_batch_size // per


def total_steps(recipe: Recipe, n_examples: int, world: int) -> int:
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    per_step = t.micro_batch_size * grad_accum(t, world) * world
    return max(1, math.ceil(t.epochs * n_examples / per_step))


def warmup_steps(train, steps: int) -> int:
    return math.ceil(train.warmup_ratio * steps) if train.warmup_ratio is not None else train.warmup_steps


# ----------------------------------------------------------------------------- checkpoints

def gather_log_variances(model, zero_stage: int) -> dict[str, torch.Tensor]:
    """Per projection, ln λ from the optimizer's float32 master values (the forward pass may see a
    bf16 copy), on the CPU. All ranks call: under ZeRO-3 the master is gathered."""
    projs = dipmod.projections(model)
    if not projs:
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in projs:
        off = p.log_variance_offset
        master = safe_get_full_fp32_param(off) if off.requires_grad and zero_stage > 0 else None
        if master is None:
            if zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([off]):
                    master = off.detach().float().clone()
            else:
                master = off.detach().float()
        out[dipmod._short(name)] = master.float().cpu() + p.base_log_variance
    return out


def gather_lambda_stats(model, zero_stage: int) -> dict:
    """Per-projection mean/min/max λ (float32 masters; every rank calls)."""
    return {k: {"mean": lam.mean().item(), "min": lam.min().item(), "max": lam.max().item()}
            for k, lam in ((k, v.exp()) for k, v in gather_log_variances(model, zero_stage).items())}


LAMBDA_FILE = "lambda.safetensors"            # a run's final ln λ per projection (a control's source)
LAMBDA_INIT_FILE = "lambda_init.safetensors"  # a control's λ, written by the run stage


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", help="resolved recipe JSON")
    ap.add_argument("--model", required=True, help="model directory (converted or base)")
    ap.add_argument("--data", required=True, help="preprocessed examples (examples.safetensors of the preprocess stage)")
    ap.add_argument("--out", help="training output directory")
    ap.add_argument("--runs", help="JSON list of {recipe, out}: train several runs one after another in this "
                                   "launch (a study's variants x seeds pay the start-up once)")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop (and save) after this much training time")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    if not args.runs and not (args.recipe and args.out):
        ap.error("give --recipe and --out, or --runs")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    use_private_extensions_dir()
    runs = json.loads(Path(args.runs).read_text()) if args.runs else [{"recipe": args.recipe, "out": args.out}]
    # Distributed set-up: everything rank-dependent is decided here, once per launch.
    first = json.loads(Path(runs[0]["recipe"]).read_text())
    device = os.environ.get("DIPNET_DEVICE") or first.get("launch", {}).get("device", "auto")  # a GPU job sets it
    timeout_s = first.get("launch", {}).get("collective_timeout_s", COLLECTIVE_TIMEOUT_S)
    rank, world, local_rank, is_main = setup_distributed(device, timeout_s)
    STOP.install()
    for spec in runs:  # the train stage passes only unfinished runs; a finished one resumes at its end
        out = Path(spec["out"])
        train_one(spec["recipe"], args.model, args.data, out, args.max_seconds, rank, world, local_rank, is_main)
        # What a run leaves behind once it has returned (its frame and autograd graph are gone):
        # recorded so a leak shows up as growth across a study's runs.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if is_main and (out / "train_summary.json").is_file():
            summary = json.loads((out / "train_summary.json").read_text())
            summary.update(live_engines=live_engines(), rss_mb=rss_mb())
            (out / "train_summary.json").write_text(json.dumps(summary, indent=2))


def save_margin_warning(save_seconds: float, margin: str | None) -> str | None:
    """A save that takes most of the Slurm job's USR1 margin (DIPNET_SIGNAL_MARGIN_S, exported by
    the job) would be cut off by the time limit: the ranks get USR1, finish their step and save,
    and the step plus the save must end before the limit. Warned when the save alone takes more
    than half of the margin (the step in flight needs the rest)."""
    try:
        margin_s = float(margin) if margin else None
    except ValueError:
        return None
    if margin_s is None or not math.isfinite(margin_s) or save_seconds <= margin_s / 2:
        return None
    return (f"this checkpoint took {save_seconds:.0f} s to save, more than half of the job's {margin_s:.0f} s "
            f"USR1 margin: a save at the time limit may not finish; raise launch.slurm.signal_margin_s")


def train_one(recipe_path, model_dir, data_path, out: Path, max_seconds, rank, world, local_rank, is_main) -> None:
    """One training run, top to bottom: set-up (data, model, engine, resume), then for every
    optimizer step: train on its micro-batches, agree across ranks, validate, log, save."""
    recipe = Recipe.model_validate(json.loads(Path(recipe_path).read_text()))
    t, d = recipe.train, recipe.dip
    ckpt_root = out / "checkpoints"
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(recipe.run.seed)

    # Set-up: tokenizer, data, schedule, model (+ DIP, + LoRA) in a DeepSpeed engine, resume.
    from dipnet.pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir, recipe.model.trust_remote_code)
    pad = tokenizer.pad_token_id
    examples = TokenizedExamples(data_path)
    val_examples = load_validation(data_path) if t.eval_every else None
    steps = total_steps(recipe, len(examples), world)
    accum = grad_accum(t, world)
    warmup = warmup_steps(t, steps)
    ds_config = build_ds_config(t, world, device.type, accum=accum)
    resume, universal = plan_resume(ckpt_root, world, ds_config, is_main)
    initial_lambda = None
    if d.method in dipmod.CONTROLS:  # written by the run stage from the dip.source run's final λ
        initial_lambda = (dipmod.read_log_variances(out / LAMBDA_INIT_FILE), str(out / LAMBDA_INIT_FILE))
    engine, optimizer, dip_config, trainable, zero3_init = build_engine(recipe, model_dir, tokenizer, ds_config,
                                                                        out.name, world, is_main, initial_lambda)
    start_step, tokens_seen, tracking = restore(engine, ckpt_root, resume, universal, is_main)
    log = StepLog(out, steps, start_step, recipe) if is_main else None
    faults = Faults.from_env()
    engine.train()
    first = collate([examples[i] for i in batch_indices(len(examples), recipe.run.seed, start_step,
                                                         t.micro_batch_size, accum, rank, world)[0]], pad)
    first = dipmod.repeat_for_trajectories(first, recipe.dip.trajectories)  # the shape training runs
    output_layer = choose_output_layer(engine, {k: v.to(device) for k, v in first.items()}, world)
    if is_main:
        print(f"{out.name}: logits computed at {'counted positions only' if output_layer is not None else 'every position'}",
              flush=True)

    def save(done: int, engine=engine) -> None:
        state = {"step": done, "tokens_seen": tokens_seen, "world_size": world, "seed": recipe.run.seed,
                 "data_position": done * t.micro_batch_size * accum * world, "grad_accum": accum,
                 "recipe": recipe.to_dict(), "dip_config": asdict(dip_config),
                 "model_dir": str(model_dir), "zero_stage": t.zero_stage, "train_method": t.method,
                 "trainable": trainable, "rng_note": "noise and batches are functions of (seed, step, rank)",
                 "validation": dict(tracking)}
        t_save = time.time()
        path = save_checkpoint(engine, ckpt_root, done, state, t.keep_last, is_main)
        seconds = time.time() - t_save
        saves.append(seconds)
        if is_main:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            saves_bytes.append(size)
            print(f"{out.name}: checkpoint {path.name} saved in {seconds:.1f} s ({size / 1e9:.2f} GB)", flush=True)
            warning = save_margin_warning(seconds, os.environ.get("DIPNET_SIGNAL_MARGIN_S"))
            if warning:
                print(f"{out.name}: warning: {warning}", flush=True)

    saves, saves_bytes = [], []  # seconds of every save this process made, and (rank 0) their sizes
    t_loop = last_save = time.time()
    timed = []  # (seconds, tokens) of every step this process ran: the summary's step-time median
    for step in range(start_step, steps):
        t0 = time.time()
        f = lr_factor(step, warmup, steps)
        for g in optimizer.param_groups:
            g["lr"] = g.get("base_lr", t.lr) * f
        # Noise and data order depend only on (seed, step, rank): a resumed run repeats them exactly.
        torch.manual_seed(recipe.run.seed * 1_000_003 + step * 1009 + rank)
        batches = [collate([examples[i] for i in idx], pad)
                   for idx in batch_indices(len(examples), recipe.run.seed, step, t.micro_batch_size, accum, rank, world)]
        sums = train_step(engine, batches, recipe, output_layer, device, world, faults, rank, step)
        # Every rank agrees on the step's statistics and on whether to stop: a time budget spent
        # (study.match=time), a stop signal (SIGTERM/SIGINT/SIGUSR1: finish this step, save, exit),
        # a save due by the clock, a non-finite loss anywhere.
        stats = agree(sums, device, world, len(batches), d.gamma,
                      over=max_seconds is not None and time.time() - t_loop >= max_seconds,
                      stop=STOP.requested,
                      save_due=t.save_every_minutes is not None and time.time() - last_save >= 60 * t.save_every_minutes)
        if stats["nonfinite"]:
            good = latest_checkpoint(ckpt_root)
            raise RunError(f"non-finite loss at step {step + 1}; stopped without saving "
                           f"(last good checkpoint: {good.name if good else 'none'})")
        if stats["over"]:
            steps = step + 1  # time budget spent: this step is the last one
        tokens_seen += stats["tokens"]
        step_time = time.time() - t0
        timed.append((step_time, stats["tokens"]))
        done = step + 1

        val, improved = None, False
        if t.eval_every and (done % t.eval_every == 0 or done == steps):
            val = validation_stats(engine, val_examples, t.micro_batch_size, rank, world, pad, device, output_layer)
            improved = track_validation(tracking, val["val_nll"], done, t.early_stopping_threshold)
            if t.early_stopping_patience and tracking["since_best"] >= t.early_stopping_patience and done < steps:
                tracking["stopped_early_at"] = done
                steps = done  # every rank saw the same all-reduced NLL: all stop here

        if done % t.log_every == 0 or done == steps or done == 1 or val is not None:
            lam = gather_lambda_stats(engine.module, t.zero_stage)  # every rank: ZeRO-3 gathers
            if log:
                log.record({"step": done, "loss": stats["loss"], "nll": stats["nll"], "prior": stats["prior"],
                            "var_penalty": stats["var_penalty"], "lr": optimizer.param_groups[0]["lr"],
                            "grad_norm": _grad_norm(engine), "tokens": stats["tokens"],
                            "counted_tokens": stats["counted_tokens"], "tokens_seen": tokens_seen,
                            "tokens_per_s": stats["tokens"] / step_time, "step_time_s": step_time,
                            "peak_mem_mb": peak_memory_mb(), "lambda": lam, "wall_s": time.time() - t_loop,
                            **(val or {})})
        if log:
            log.progress(stats["loss"], stats["tokens"] / step_time)

        best_now = t.keep_best and improved
        if done % t.save_every == 0 or done == steps or stats["stop"] or stats["save_due"] or best_now:
            save(done)
            last_save = time.time()
            if best_now and is_main:  # after the save: a crash in between keeps the previous best
                ptr = ckpt_root / "best.tmp"
                ptr.write_text(f"{CKPT_PREFIX}{done:06d}")
                os.replace(ptr, ckpt_root / "best")
        if stats["stop"] and done < steps:  # a signal in the last step: just finish the run
            if is_main:
                print(f"stopped by a signal after step {done}; checkpoint saved", flush=True)
            raise Stopped(f"stopped by a signal after step {done} (checkpoint saved; a rerun resumes)")
        if done >= steps:
            break

    final_lambda = gather_log_variances(engine.module, t.zero_stage)  # every rank: ZeRO-3 gathers
    if is_main and final_lambda:
        dipmod.write_log_variances(out / LAMBDA_FILE, final_lambda)
    if log:
        summary = {"steps": steps, "resumed_from": start_step, "tokens_seen": tokens_seen, "world_size": world,
                   "wall_s": time.time() - t_loop, "last": log.last, "step_time": step_time_stats(timed),
                   "logits": "counted positions" if output_layer is not None else "every position",
                   "attn_implementation": engine.module.config._attn_implementation,
                   "gradient_checkpointing": t.gradient_checkpointing,
                   "checkpoint": str((t.keep_best and best_checkpoint(ckpt_root)) or latest_checkpoint(ckpt_root)),
                   "validation": tracking or None, "data_mixture": data_mixture(data_path),
                   "checkpoint_save_s": max(saves, default=None), "checkpoint_bytes": max(saves_bytes, default=None)}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.close({"steps": steps, "tokens_seen": tokens_seen, "wall_s": summary["wall_s"]})
        from dipnet.pipeline.plots import plot_training

        plot_training(out / "metrics.jsonl", out / "plots")
    # Release the engine explicitly: a study trains many runs in one process, and an engine
    # that is only deleted keeps its optimizer state and buffers alive (measured: one more live
    # engine per run; at 7B ~15 GB of GPU memory each).
    engine.destroy()
    del engine, optimizer, zero3_init, save
    torch.distributed.barrier()


# ----------------------------------------------------------------------------- the loop's parts

def data_mixture(data_path) -> list | None:
    """The sources and shares the preprocess stage mixed (its preprocess.json beside the examples)."""
    meta = Path(data_path).with_name("preprocess.json")
    try:
        return json.loads(meta.read_text()).get("mixture")
    except (OSError, ValueError, AttributeError):
        return None


def load_validation(data_path) -> TokenizedExamples:
    """The validation examples the preprocess stage wrote beside the training ones."""
    from dipnet.pipeline.data import VALIDATION

    val_path = Path(data_path).with_name(VALIDATION)
    if not val_path.is_file():
        raise RunError(f"train.eval_every: {val_path} is missing (the preprocess stage writes it from "
                       "data.validation or data.validation_fraction)")
    return TokenizedExamples(val_path)


def plan_resume(ckpt_root: Path, world: int, ds_config: dict, is_main: bool) -> tuple[Path | None, Path | None]:
    """The latest complete checkpoint, if any, and its universal form when another number of
    ranks wrote it: DeepSpeed's universal checkpoint (ZeRO-1/2/3) re-partitions parameters and
    optimizer state for this world size (and `ds_config` is told to load it)."""
    resume = latest_intact_checkpoint(ckpt_root, is_main)
    if resume is None:
        return None, None
    written_by = read_trainer_state(resume)["world_size"]
    if written_by == world:
        return resume, None
    universal = to_universal(resume, is_main)
    ds_config["checkpoint"] = {"load_universal": True}
    if is_main:
        print(f"resuming {written_by}-rank checkpoint {resume.name} on {world} ranks (universal checkpoint)", flush=True)
    return resume, universal


def build_engine(recipe: Recipe, model_dir, tokenizer, ds_config: dict, name: str, world: int, is_main: bool,
                 initial_lambda=None):
    """The model (+ DIP, + LoRA) wrapped in a DeepSpeed engine. Returns (engine, optimizer,
    dip_config, trainable parameter names, the ZeRO-3 loading context to keep alive)."""
    import deepspeed

    from dipnet.pipeline.models import check_vocab

    t = recipe.train
    # ZeRO-3: transformers loads the weights straight into partitions (deepspeed.zero.Init) while
    # this object is alive, so no rank ever holds the whole model; λ and LoRA adapters created
    # after loading are partitioned by deepspeed.initialize. Weights load in the training dtype.
    zero3_init = None
    if t.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_init = HfDeepSpeedConfig(ds_config)
    model, dip_config = setup_model(recipe, model_dir, trust_remote_code=recipe.model.trust_remote_code,
                                    dtype=torch.bfloat16 if t.precision == "bf16" else torch.float32,
                                    initial_lambda=initial_lambda)
    check_vocab(model, tokenizer, model_dir)
    if t.precision == "bf16":
        # One dtype for everything that trains, as ZeRO-1/2 make it themselves (they cast the whole
        # module to bf16). ZeRO-3 flattens the trained partitions into one buffer and refuses mixed
        # dtypes, which a full fine-tune would hand it: weights loaded in bf16, λ created in float32
        # after loading. λ keeps its resolution in bf16 through the offset parameterisation
        # (dip.DistributionalInputProjection); its float32 master lives in the optimizer.
        if len({p.dtype for p in model.parameters() if p.requires_grad}) > 1:
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.bfloat16:
                    p.data = p.data.to(torch.bfloat16)
    # What trains, by name: checkpoints hold only these (frozen weights come from model_dir),
    # and export checks that every one of them is in the checkpoint.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if t.optimizer == "sam":
        check_sam_size(sum(p.numel() for p in model.parameters() if p.requires_grad))
    # ZeRO partitions every parameter, λ included, at initialize: λ exist and hold their initial
    # values before partitioning, so ZeRO-3 never sees an uninitialised one.
    optimizer = build_optimizer(model, recipe)
    if is_main:
        print(f"{name}: optimizer {type(optimizer).__name__}, ZeRO-{t.zero_stage}"
              f"{' + offload' if t.offload else ''}, {world} ranks", flush=True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer, dip_config, trainable, zero3_init


def restore(engine, ckpt_root: Path, resume: Path | None, universal: Path | None, is_main: bool) -> tuple[int, int, dict]:
    """Load `resume` (if any) into the engine; returns (step, tokens seen, validation tracking).
    Interrupted checkpoint writes (.tmp-*) are removed first: they are never used."""
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    torch.distributed.barrier()
    if resume is None:
        return 0, 0, {}
    state = read_trainer_state(resume)
    with weights_only_torch_load():  # DeepSpeed's loader would unpickle freely; ours holds tensors and plain data
        # Not strict: the checkpoint holds only trainable parameters; the frozen ones were
        # just loaded from model_dir (read_trainer_state checked the checkpoint is whole).
        engine.load_checkpoint(str(universal or resume), tag=resume.name, load_optimizer_states=True,
                               load_lr_scheduler_states=False, load_module_strict=False)
    if is_main:
        print(f"resumed from {resume} at step {state['step']}", flush=True)
    return state["step"], state["tokens_seen"], validation_tracking(state)


def choose_output_layer(engine, batch: dict, world: int):
    """The output layer when logits may be computed at counted positions only (where the model's
    logits are exactly its output layer on its last hidden state, checked on a real batch), else None."""
    return engine.module.get_output_embeddings() if counted_logits_are_exact(engine, engine.module, batch, world) else None


def step_token_count(counted: list[int], device, world: int) -> torch.Tensor:
    """Counted (label) tokens in the whole optimizer step: every micro-batch on every rank."""
    n = torch.tensor([float(sum(counted))], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(n)
    return n[0]


def train_step(engine, batches: list[dict], recipe: Recipe, output_layer, device, world: int, faults, rank: int,
               step: int) -> torch.Tensor:
    """Forward, backward and DeepSpeed step for each micro-batch of one optimizer step on this
    rank (DeepSpeed updates the weights after the last). Returns this rank's sums, kept on the
    device (one host sync per step): loss, NLL share, prior, variance share, tokens, counted tokens."""
    t, d = recipe.train, recipe.dip
    m = d.trajectories
    alpha, beta, reduction = d.prior_weights() if d.method == "dip" else (0.0, 0.0, "sum")  # only learned λ has a prior
    counted = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    # The NLL is the mean over every counted token of the global batch (m trajectories each).
    step_tokens = (step_token_count(counted, device, world) * m).clamp_min(1).to(torch.float32)
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for batch, n_counted in zip(batches, counted):
        tokens = torch.tensor([int(batch["attention_mask"].sum()), n_counted])
        batch = {k: v.to(device) for k, v in dipmod.repeat_for_trajectories(batch, m).items()}

        def objective(forward, batch=batch, module=engine.module):
            lp, mask = next_token_logprobs(forward, batch, output_layer)
            return dipmod.objective_terms(lp, mask, m, module, alpha, beta, d.gamma, reduction,
                                          step_tokens=step_tokens.to(lp.device), micro_batches=len(batches) * world)

        sam_saved = (sam_perturb(engine.module, lambda module=engine.module: objective(module)["loss"], t.sam_rho, world)
                     if t.optimizer == "sam" else None)
        terms = objective(engine)
        faults.mid_step(rank, step + 1, terms)
        engine.backward(terms["loss"])
        if sam_saved is not None:  # SAM: the update uses the perturbed point's gradient, from w
            sam_restore(sam_saved)
        engine.step()
        faults.after_micro_step()
        sums += torch.cat([torch.stack([terms["loss"].detach(), terms["nll"], terms["prior"], terms["var_penalty"]]),
                           tokens.to(device)]).to(torch.float64)
    return sums


def agree(sums: torch.Tensor, device, world: int, micro_batches: int, gamma: float, *, over: bool, stop: bool,
          save_due: bool) -> dict:
    """One all-reduce carries the step's statistics and the flags every rank must agree on."""
    flags = torch.tensor([0.0, float(over), float(stop), float(save_due)], dtype=torch.float64, device=device)
    packed = torch.cat([sums, flags])
    packed[6] = (~torch.isfinite(sums[0])).to(torch.float64)
    torch.distributed.all_reduce(packed)
    loss_sum, nll, prior_sum, var, tokens, counted, nonfinite, over_n, stop_n, due_n = packed.cpu().tolist()
    prior = prior_sum / (micro_batches * world)  # the same value in every micro-batch
    return {"loss": nll + prior + gamma * var, "nll": nll, "prior": prior, "var_penalty": var,
            "tokens": int(round(tokens)), "counted_tokens": int(round(counted)), "nonfinite": nonfinite > 0,
            "over": over_n > 0, "stop": stop_n > 0, "save_due": due_n > 0}


def track_validation(tracking: dict, val_nll: float, done: int, threshold: float = 0.0) -> bool:
    """Update the best step/NLL and the patience count (`since_best`: validations since one that
    beat the best by more than `threshold`); returns whether this one is the best."""
    first = "best_val_nll" not in tracking
    improved = first or val_nll < tracking["best_val_nll"]
    if first or val_nll < tracking["best_val_nll"] - threshold:
        tracking["since_best"] = 0
    else:
        tracking["since_best"] = tracking.get("since_best", 0) + 1
    if improved:
        tracking.update(best_step=done, best_val_nll=val_nll)
    return improved


class StepLog:
    """The main rank's record of a run: metrics.jsonl, a progress bar, TensorBoard and the other
    trackers in train.report_to."""

    def __init__(self, out: Path, steps: int, start_step: int, recipe=None):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        from dipnet.pipeline.trackers import flat_params, open_run

        report_to = recipe.train.report_to if recipe is not None else ["tensorboard"]
        self.writer = SummaryWriter(str(out / "tb")) if "tensorboard" in report_to else None
        # out is <run dir>/train/<variant>-s<seed>: the study is the run directory.
        self.trackers = open_run(recipe, out.parent.parent, out.name, out, flat_params(recipe.to_dict())) \
            if recipe is not None else None
        self.metrics = open(out / "metrics.jsonl", "a")
        self.bar = tqdm(total=steps, initial=start_step, desc=f"train {out.name}", dynamic_ncols=True,
                        mininterval=1.0, file=sys.stderr)
        self.last = None

    def record(self, rec: dict) -> None:
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        from dipnet.pipeline.trackers import step_metrics

        metrics = step_metrics(rec)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, rec["step"])
        if self.trackers is not None:
            self.trackers.log(metrics, rec["step"])
        self.last = rec

    def progress(self, loss: float, tokens_per_s: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)

    def close(self, summary: dict | None = None) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.trackers is not None:
            self.trackers.finish({k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str))})
        self.metrics.close()


class Faults:
    """Fault injection for the tests, from the environment: DIPNET_FAULT_KILL="RANK:STEP" (die
    mid-step, like kill -9), DIPNET_FAULT_HANG="RANK:STEP" (stop mid-step and never come back, as
    a rank stuck in a driver call does; SIGTERM still ends it), DIPNET_FAULT_NAN="STEP" (a
    non-finite loss), DIPNET_FAULT_SLOW_STEP=
    "SECONDS" per micro-step, or "SECONDS:first-start" (only before a Slurm requeue: a time limit
    then hits the first start and the restart finishes quickly)."""

    def __init__(self, kill=None, nan=None, slow=0.0, hang=None):
        self.kill, self.nan, self.slow, self.hang = kill, nan, slow, hang

    @classmethod
    def from_env(cls) -> "Faults":
        fk = os.environ.get("DIPNET_FAULT_KILL")
        nan = os.environ.get("DIPNET_FAULT_NAN")
        spec = os.environ.get("DIPNET_FAULT_SLOW_STEP", "0").split(":")
        slow = float(spec[0] or 0)
        if spec[1:] == ["first-start"] and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            slow = 0.0
        hang = os.environ.get("DIPNET_FAULT_HANG")
        return cls(tuple(int(x) for x in fk.split(":")) if fk else None, int(nan) if nan else None, slow,
                   tuple(int(x) for x in hang.split(":")) if hang else None)

    def mid_step(self, rank: int, step: int, terms: dict) -> None:
        if self.kill == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang == (rank, step):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(60)
        if self.nan == step:
            terms["loss"] = terms["loss"] * float("nan")

    def after_micro_step(self) -> None:
        if self.slow:
            time.sleep(self.slow)


def step_time_stats(timed: list[tuple[float, int]]) -> dict | None:
    """Median step time (and its 10th-90th percentile spread) over every step but the warm-up
    ones (the first 10%, at least 1, at most 10: allocator, thread pools and the first all-reduce
    make them slow), and tokens/s over the same steps. This is what the report's cost table uses."""
    warm = min(10, max(1, len(timed) // 10))
    rest = sorted(timed[warm:]) if len(timed) > warm else sorted(timed)
    if not rest:
        return None
    q = lambda f: rest[min(len(rest) - 1, int(f * len(rest)))][0]  # noqa: E731
    seconds = sum(t for t, _ in rest)
    return {"median_s": q(0.5), "p10_s": q(0.1), "p90_s": q(0.9), "steps_timed": len(rest),
            "warmup_excluded": len(timed) - len(rest), "tokens_per_s": sum(n for _, n in rest) / seconds if seconds else None}


def live_engines() -> int:
    """DeepSpeed engines still reachable in this process (0 once a run has been released)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, DeepSpeedEngine))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _grad_norm(engine) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except Exception:
        return None
    if g is None:
        return None
    return float(g.item() if hasattr(g, "item") else g)


def finish(code: int) -> None:
    """ZeRO-3 on gloo can abort at interpreter exit: barrier, destroy the group, flush, _exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if code == 0:
            try:
                torch.distributed.barrier()
            except Exception:
                pass
        try:
            torch.distributed.destroy_process_group()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = 0
    try:
        main()
    except DipnetError as exc:
        print(f"dipnet error: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    finish(code)
