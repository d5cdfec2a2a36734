"""A ~125M-parameter random Llama through the real pipeline on one GPU: DIP conversion, a
DeepSpeed ZeRO-2 bf16 run of pipeline/train.py with DIP, export with verification. Prints step
time, tokens/s, peak GPU memory and export time. Driven by bench/gpu_smoke.sh on a lent GPU.

    python bench/gpu_smoke.py --out /tmp/smoke             # GPU: ~125M Llama, 40 steps
    python bench/gpu_smoke.py --out /tmp/smoke --cpu       # the same flow, tiny, on CPU (a dry run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on CPU: checks the flow, measures nothing")
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dipnet.launch import local as launch
    from dipnet.pipeline.base_model import train_tokenizer
    from dipnet.pipeline.convert import convert
    from dipnet.pipeline.data import preprocess
    from dipnet.pipeline.dip import DipConfig
    from dipnet.pipeline.export import export_checkpoint
    from dipnet.pipeline.recipe import Recipe, apply_overrides

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    if not (base / "model.safetensors").is_file():
        base.mkdir(exist_ok=True)
        train_tokenizer(512, 0, base)
        AutoTokenizer.from_pretrained(base).save_pretrained(base)
        shape = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4) if a.cpu else \
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=3, **shape)
        LlamaForCausalLM(cfg).save_pretrained(base, safe_serialization=True)
    n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(base).parameters())
    convert(base, out / "dip", DipConfig(method="dip", init_variance=3e-3)) if not (out / "dip").exists() else None

    micro, length = (4, 96) if a.cpu else (16, 256)
    recipe = Recipe.model_validate(apply_overrides({}, {
        "train.max_steps": a.steps, "train.save_every": a.steps, "train.micro_batch_size": micro,
        "train.zero_stage": 2, "train.precision": "bf16", "train.log_every": 1, "train.lr": 3e-4,
        "dip.method": "dip", "dip.init_variance": 3e-3, "data.max_length": length,
        "data.synthetic.n_train": 2000, "launch.launcher": "single", "launch.device": "cpu" if a.cpu else "cuda"}))
    data = preprocess(recipe.data, out / "dip", out / "pre")
    run = out / "train"
    run.mkdir(exist_ok=True)
    (run / "recipe.json").write_text(json.dumps(recipe.to_dict()))
    port = launch.choose_master_port(None)
    cmd = launch.train_command(recipe.launch, 1, port, ["--recipe", str(run / "recipe.json"), "--model",
                                                        str(out / "dip"), "--data", data["path"], "--out", str(run)])
    t0 = time.time()
    launch.run_ranks(cmd, launch.rank_env(1, port), run / "train.log", 600, single=True, port=port)
    train_s = time.time() - t0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > 3]  # warm-up (kernel selection, allocator) excluded
    t0 = time.time()
    exp = export_checkpoint(run, out / "export", dtype="bfloat16")
    export_s = time.time() - t0
    lam = rows[-1]["lambda"]
    print(json.dumps({
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "parameters": n_params, "steps": len(rows), "micro_batch": micro, "seq_len": length,
        "step_time_s_median": statistics.median(r["step_time_s"] for r in timed),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_gpu_mem_mb": max(r["peak_mem_mb"] for r in rows), "nll_first_last": [rows[0]["nll"], rows[-1]["nll"]],
        "lambda_mean_first_last_layer0": [rows[0]["lambda"]["0.dip_input"]["mean"], lam["0.dip_input"]["mean"]],
        "train_wall_s": round(train_s, 1), "export_s": round(export_s, 1), "export_max_logit_diff": exp["max_logit_diff"],
        "export_tolerance": exp["tolerance"]}, indent=2))


if __name__ == "__main__":
    main()
