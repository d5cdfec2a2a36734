"""What a full fine-tune's checkpoint costs to save, per trained parameter: the figures behind the
Slurm train job's default USR1 margin (launch/slurm.py, estimate_signal_margin).

    python bench/checkpoint_save.py [--out DIR] [--precision bf16,fp32]

A random SmolLM2-135M-shaped model (its real config, the embedded base's tokenizer), DIP attached,
full fine-tune on one DeepSpeed ZeRO-2 rank for one step, saved through dipnet's own
save_checkpoint (temporary directory, checksums, rename). The trainer reports the save's seconds
and bytes (train_summary.json); printed here per parameter, with the bytes the margin estimate
assumes beside them. The save time is this machine's disk; a cluster's shared file system is
what the margin's assumed bandwidth stands for.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--precision", default="bf16,fp32")
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("gpu_check", HERE / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    from transformers import AutoTokenizer

    from dipnet.launch.slurm import OPTIMIZER_BYTES_PER_PARAM
    from dipnet.pipeline.base_model import train_tokenizer
    from dipnet.pipeline.convert import convert
    from dipnet.pipeline.dip import DipConfig
    from dipnet.pipeline.models import meta_model

    work = Path(a.out or tempfile.mkdtemp(prefix="ckpt-save-"))
    tok = work / "tokenizer"
    if not (tok / "tokenizer_config.json").is_file():
        tok.mkdir(parents=True, exist_ok=True)
        train_tokenizer(512, 0, tok)
        AutoTokenizer.from_pretrained(str(tok)).save_pretrained(str(tok))
    base = gc.write_model(work / "smollm2-base", "llama", {**gc.SMOLLM2, "vocab_size": 512}, tok)
    dip = work / "smollm2-dip"
    if not dip.exists():
        convert(base, dip, DipConfig(method="dip", init_variance=3e-3))
    n = sum(p.numel() for p in meta_model(dip).parameters())
    print(f"SmolLM2-135M shape (vocabulary 512): {n / 1e6:.1f}M trained parameters (full fine-tune + λ)")
    print(f"{'precision':>9} {'save s':>7} {'GB':>6} {'bytes/param':>11} {'assumed':>7} {'GB/s':>6} {'s per 1B params':>15}")
    for precision in a.precision.split(","):
        run = work / f"run-{precision}"
        gc.train(run, dip, {"train.method": "full", "train.zero_stage": 2, "train.precision": precision,
                            "train.max_steps": 1, "train.save_every": 1, "train.micro_batch_size": 1,
                            "data.max_length": 64, "dip.method": "dip", "dip.init_variance": 3e-3}, "cpu")
        summary = json.loads((run / "train_summary.json").read_text())
        seconds, size = summary["checkpoint_save_s"], summary["checkpoint_bytes"]
        assumed = (2 if precision == "bf16" else 4) + OPTIMIZER_BYTES_PER_PARAM
        print(f"{precision:>9} {seconds:7.2f} {size / 1e9:6.2f} {size / n:11.2f} {assumed:7d} {size / seconds / 1e9:6.2f} "
              f"{seconds / n * 1e9:15.1f}")


if __name__ == "__main__":
    main()
