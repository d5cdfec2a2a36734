"""The GPU check of the 8-GPU-node issue: what a first GPU machine must show, in one JSON.

    python bench/gpu_check.py --out DIR          # on a GPU (bf16, real shapes; ~5 minutes)
    python bench/gpu_check.py --out DIR --cpu    # the same steps on CPU at toy sizes (make test)

Driven by bench/gpu_check.sh, which carries dipnet and deepspeed's pure-Python wheel to a machine
without a package registry. Every model is built here from its config with random weights and
the embedded base's tokenizer (no hub, nothing to download): the shapes are the real ones.

Steps (each one's figures, or its error, under its name in the JSON; one failure does not hide
the others):
  env            versions, the GPU, which SDPA kernels run in bf16 (flash, memory-efficient, cuDNN, math)
  smollm2_lora   SmolLM2-135M shape: LoRA + DIP, bf16, ZeRO-2, one rank, 20 steps, then resumed to 30,
                 exported with verification: λ moved, loss finite, step time, peak memory
  gemma3_zero3   Gemma 3 270M shape: full fine-tune + DIP under ZeRO-3, bf16, then exported (and its
                 checkpoint's save time and size: what the USR1 margin assumes, on a GPU node's disk)
  width_7b       two Qwen2.5-7B-width blocks in plain torch: memory and step time at 1x2048 and 4x512,
                 with and without DIP and gradient checkpointing; gradients with and without
                 checkpointing compared (same seed)
  dip_overhead   bench/dip_overhead.py --device cuda (GPU only)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

# Real shapes (from the models' config.json) and the toy sizes the CPU dry run uses instead.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True)
GEMMA3_270M = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, vocab_size=262144, max_position_embeddings=32768,
                   sliding_window=512, layer_types=None)
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                 vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
           vocab_size=512, max_position_embeddings=512)


def step(report: dict, name: str, fn) -> None:
    t0 = time.time()
    try:
        report[name] = {**fn(), "ok": True}
    except Exception as exc:  # the check goes on: one JSON with every step's outcome
        report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:800],
                        "trace": traceback.format_exc()[-1500:]}
    report[name]["wall_s"] = round(time.time() - t0, 1)
    print(f"== {name}: {'ok' if report[name]['ok'] else report[name]['error']} ({report[name]['wall_s']} s)",
          file=sys.stderr, flush=True)


def env_info(cuda: bool) -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as exc:
        info["deepspeed"] = f"unavailable ({type(exc).__name__})"
    if not cuda:
        return {**info, "device": "cpu"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1), capability=list(torch.cuda.get_device_capability(0)))
    q = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    sdpa = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            torch.cuda.synchronize()
            sdpa[name.lower()] = True
        except Exception as exc:
            sdpa[name.lower()] = f"{type(exc).__name__}"
    info["sdpa_bf16"] = sdpa
    return info


def write_model(out: Path, family: str, shape: dict, tokenizer_dir: Path) -> Path:
    """A random model of `family` with `shape`, the tokenizer beside it; returns the directory."""
    import shutil

    import torch
    import transformers as T

    if (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, out / f.name)
    common = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = {"llama": T.LlamaConfig, "gemma3_text": T.Gemma3TextConfig}[family](**{**shape, **common})
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out), safe_serialization=True)
    return out


def train(out: Path, model_dir: Path, overrides: dict, device: str) -> list[dict]:
    """One single-rank DeepSpeed run of pipeline/train.py (resumes when `out` has checkpoints)."""
    from dipnet.launch import local as launch
    from dipnet.pipeline.data import preprocess
    from dipnet.pipeline.recipe import Recipe, apply_overrides

    recipe = Recipe.model_validate(apply_overrides({}, {
        "train.log_every": 1, "train.precision": "bf16", "data.synthetic.n_train": 1000, "launch.launcher": "single",
        "launch.device": device, **overrides}))
    data = preprocess(recipe.data, model_dir, out.parent / f"{out.name}-pre")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict()))
    port = launch.choose_master_port(None)
    cmd = launch.train_command(recipe.launch, 1, port, ["--recipe", str(out / "recipe.json"), "--model", str(model_dir),
                                                        "--data", data["path"], "--out", str(out)])
    launch.run_ranks(cmd, launch.rank_env(1, port), out / "train.log", 900, single=True, port=port)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_summary(rows: list[dict]) -> dict:
    timed = [r for r in rows if r["step"] > 3] or rows  # warm-up (kernel selection, allocator) excluded
    lam0 = next(iter(rows[0]["lambda"].values()))["mean"] if rows[0].get("lambda") else None
    lam1 = next(iter(rows[-1]["lambda"].values()))["mean"] if rows[-1].get("lambda") else None
    return {"steps": rows[-1]["step"], "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]],
            "loss_finite": all(math.isfinite(r["loss"]) for r in rows),
            "lambda_first_block_first_last": [lam0, lam1], "lambda_moved": lam0 is not None and lam0 != lam1,
            "step_time_s_median": statistics.median(r["step_time_s"] for r in timed),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in timed),
            "peak_mem_mb": max(r.get("peak_mem_mb") or 0 for r in rows)}


def smollm2_lora(work: Path, tok: Path, cpu: bool) -> dict:
    from dipnet.pipeline.convert import convert
    from dipnet.pipeline.dip import DipConfig
    from dipnet.pipeline.export import export_checkpoint

    base = write_model(work / "smollm2-base", "llama", TOY if cpu else SMOLLM2, tok)
    dip = work / "smollm2-dip"
    if not dip.exists():
        convert(base, dip, DipConfig(method="dip", init_variance=3e-3))
    first, total = (3, 5) if cpu else (20, 30)
    over = {"train.method": "lora", "train.lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "train.zero_stage": 2, "train.micro_batch_size": 4 if cpu else 8, "data.max_length": 96 if cpu else 512,
            "dip.method": "dip", "dip.init_variance": 3e-3, "train.lr": 1e-3}
    run = work / "smollm2-run"
    train(run, dip, {**over, "train.max_steps": first, "train.save_every": first}, "cpu" if cpu else "cuda")
    rows = train(run, dip, {**over, "train.max_steps": total, "train.save_every": total}, "cpu" if cpu else "cuda")
    resumed = "resumed from" in (run / "train.log").read_text()
    t0 = time.time()
    exp = export_checkpoint(run, work / "smollm2-export", dtype="bfloat16")
    return {**run_summary(rows), "resumed_at": first, "resumed": resumed, "export_s": round(time.time() - t0, 1),
            "export_max_logit_diff": exp["max_logit_diff"], "export_tolerance": exp["tolerance"],
            "lora_merged": exp["lora_merged"]}


def gemma3_zero3(work: Path, tok: Path, cpu: bool) -> dict:
    from dipnet.pipeline.convert import convert
    from dipnet.pipeline.dip import DipConfig
    from dipnet.pipeline.export import export_checkpoint

    shape = {**TOY, "head_dim": 32} if cpu else GEMMA3_270M
    base = write_model(work / "gemma3-base", "gemma3_text", {k: v for k, v in shape.items() if v is not None}, tok)
    dip = work / "gemma3-dip"
    if not dip.exists():
        convert(base, dip, DipConfig(method="dip", init_variance=3e-3))
    steps = 3 if cpu else 20
    rows = train(work / "gemma3-run", dip, {"train.method": "full", "train.zero_stage": 3, "train.max_steps": steps,
                                            "train.save_every": steps, "train.micro_batch_size": 4 if cpu else 8,
                                            "data.max_length": 96 if cpu else 512, "dip.method": "dip",
                                            "dip.init_variance": 3e-3, "train.lr": 1e-4}, "cpu" if cpu else "cuda")
    summary = json.loads((work / "gemma3-run" / "train_summary.json").read_text())  # the save behind the USR1 margin
    t0 = time.time()
    exp = export_checkpoint(work / "gemma3-run", work / "gemma3-export", dtype="bfloat16")
    return {**run_summary(rows), "export_s": round(time.time() - t0, 1), "export_max_logit_diff": exp["max_logit_diff"],
            "export_tolerance": exp["tolerance"], "checkpoint_save_s": summary["checkpoint_save_s"],
            "checkpoint_gb": summary["checkpoint_bytes"] / 1e9}


def width_7b(cpu: bool) -> dict:
    """Two blocks at Qwen2.5-7B width, plain torch, bf16: what one rank's activations cost, and
    whether the recompute of gradient checkpointing replays DIP's noise (the same gradients up to
    the kernels' own run-to-run difference, measured beside it)."""
    import torch
    import transformers as T

    from dipnet.pipeline import dip as dipmod

    device = "cpu" if cpu else "cuda"
    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 max_position_embeddings=4096) if cpu else QWEN25_7B
    batches = [(1, 256), (4, 64)] if cpu else [(1, 2048), (4, 512)]
    cfg = T.Qwen2Config(num_hidden_layers=2, **shape)

    def steps(model, x):
        """Three forward+backward steps: (best time, peak memory, last two steps' gradients)."""
        times, grads = [], []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            if not cpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(2)  # the same DIP noise in every step, with and without checkpointing
            t0 = time.time()
            model(input_ids=x, labels=x).loss.backward()
            if not cpu:
                torch.cuda.synchronize()
            times.append(time.time() - t0)
            grads = grads[-1:] + [{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}]
        peak = None if cpu else round(torch.cuda.max_memory_allocated() / 2**20)
        return min(times[1:]), peak, grads

    def max_diff(a, b):
        return max((a[n].float() - b[n].float()).abs().max().item() for n in a)

    rows, diff_ckpt, diff_repeat = [], 0.0, 0.0
    for use_dip in (False, True):
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(cfg).to(device, torch.bfloat16).train()
        if use_dip:
            dipmod.attach_dip(model, dipmod.DipConfig(method="dip", init_variance=3e-3))
        for b, s in batches:
            x = torch.randint(3, shape["vocab_size"], (b, s), generator=torch.Generator().manual_seed(1)).to(device)
            model.gradient_checkpointing_disable()
            t_plain, m_plain, g_plain = steps(model, x)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            t_ckpt, m_ckpt, g_ckpt = steps(model, x)
            diff_repeat = max(diff_repeat, max_diff(g_plain[0], g_plain[1]))
            diff_ckpt = max(diff_ckpt, max_diff(g_plain[1], g_ckpt[1]))
            rows.append({"dip": use_dip, "batch": b, "seq": s, "step_s": [round(t_plain, 4), round(t_ckpt, 4)],
                         "peak_mem_mb": [m_plain, m_ckpt]})
            del g_plain, g_ckpt
        del model
        if not cpu:
            torch.cuda.empty_cache()
    return {"blocks": 2, "shape": shape, "rows (without, with checkpointing)": rows,
            "max_grad_diff_checkpointing": diff_ckpt, "max_grad_diff_same_step_repeated": diff_repeat}


def dip_overhead(cpu: bool) -> dict:
    if cpu:
        return {"skipped": "GPU only (bench/dip_overhead.py measures the CPU on its own)"}
    res = subprocess.run([sys.executable, str(Path(__file__).parent / "dip_overhead.py"), "--device", "cuda",
                          "--rounds", "3"], capture_output=True, text=True, timeout=200)
    return {"rc": res.returncode, "stdout": res.stdout[-3000:], "stderr": res.stderr[-800:] if res.returncode else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="toy sizes on CPU: checks every step's flow, measures nothing")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from dipnet.pipeline.base_model import train_tokenizer

    cuda = not a.cpu
    if cuda and not torch.cuda.is_available():
        print("error: no usable CUDA device (run with --cpu for the dry run)", file=sys.stderr)
        return 2
    work = Path(a.out)
    tok = work / "tokenizer"
    if not (tok / "tokenizer_config.json").is_file():
        tok.mkdir(parents=True, exist_ok=True)
        train_tokenizer(512, 0, tok)
        AutoTokenizer.from_pretrained(str(tok)).save_pretrained(str(tok))
    report: dict = {}
    step(report, "env", lambda: env_info(cuda))
    step(report, "smollm2_lora", lambda: smollm2_lora(work, tok, a.cpu))
    step(report, "gemma3_zero3", lambda: gemma3_zero3(work, tok, a.cpu))
    step(report, "width_7b", lambda: width_7b(a.cpu))
    step(report, "dip_overhead", lambda: dip_overhead(a.cpu))
    for v in report.values():
        if v.get("ok"):
            v.pop("trace", None)
    print(json.dumps(report, indent=2))
    (work / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0 if all(v["ok"] for v in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
