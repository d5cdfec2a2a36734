"""The `convert` stage: a Hugging Face causal LM directory -> the same directory with DIP.

    dipnet convert MODEL_DIR --out DIR --method dip --init-variance 1e-2

Output: the base weight files copied byte for byte (safetensors, and the shard index if any),
config, tokenizer and generation config, plus `dip/dip.safetensors` (every λ at its initial
value) and `dip/dip_config.json`. `load_causal_lm(DIR)` reattaches the projections; plain
`AutoModelForCausalLM.from_pretrained(DIR)` gives the base model, so the mean path is the base
model bit for bit.

The weights are never loaded: the architecture is built on the meta device to find the blocks
and their width, so converting a 7B model needs no more memory than a 1M one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dipnet.pipeline.dip import DipConfig, attach_dip, initial_dip_state, model_family, save_dip
from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.models import (TOKENIZER_FILES, check_model_dir, check_weights_match, copy_tokenizer_files,
                                    load_tokenizer, meta_model, weight_files)
from dipnet.pipeline.outputs import output_dir

__all__ = ["convert", "TOKENIZER_FILES"]


def convert(model_dir: str | Path, out_dir: str | Path, config: DipConfig, *, trust_remote_code: bool = False) -> dict:
    """Attach DIP to the model in `model_dir` and write it to `out_dir`. Returns a summary."""
    src = Path(model_dir)
    check_model_dir(src, trust_remote_code)
    model = meta_model(src, trust_remote_code)
    family = model_family(model)
    if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        tok = load_tokenizer(src, trust_remote_code)
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tok) > rows:
            raise UsageError(f"{src}: tokenizer has {len(tok)} tokens but the model's embedding has {rows} rows "
                             "(tokenizer/model mismatch)")
    files = weight_files(src)
    check_weights_match(model, files, src)
    names = attach_dip(model, config)
    with output_dir(out_dir, "model", inputs=[src]) as tmp:
        for f in files + [src / "config.json", src / "model.safetensors.index.json"]:
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        copy_tokenizer_files(src, tmp)
        if config.method != "none":
            save_dip(model, config, tmp, state=initial_dip_state(model))
    return {"family": family, "projections": len(names), "method": config.method, "out": str(out_dir),
            "weight_files": len(files)}
