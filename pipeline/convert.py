"""The `convert` stage: a Hugging Face causal LM directory -> the same directory with DIP.

    dipnet convert MODEL_DIR --out DIR --method dip --init-variance 1e-2

Output: the untouched base weights (safetensors), config, tokenizer and generation config,
plus `dip/dip.safetensors` and `dip/dip_config.json`. `load_causal_lm(DIR)` reattaches the
projections; plain `AutoModelForCausalLM.from_pretrained(DIR)` gives the base model.

Loading rules (for every model this project reads): weights from safetensors only (a
pickle-only checkpoint is refused), no remote code unless asked for, and a clear one-line
error for a directory that is not a model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dipnet.pipeline.dip import DipConfig, attach_dip, base_state_dict, load_dip, model_family, save_dip
from dipnet.pipeline.errors import UsageError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


def check_model_dir(model_dir: str | Path, trust_remote_code: bool = False) -> dict:
    """Validate a model directory before loading; returns its config.json as a dict."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UsageError(f"{d}: no such model directory")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{d}: not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{cfg_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not any(d.glob("*.safetensors")):
        pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise UsageError(f"{d}: only pickle checkpoints ({', '.join(sorted(pickles))}); "
                             "dipnet loads safetensors only (convert with safetensors first)")
        raise UsageError(f"{d}: no *.safetensors weights")
    if cfg.get("auto_map") and not trust_remote_code:
        raise UsageError(f"{cfg_path}: this model needs its own code (auto_map); set model.trust_remote_code: true "
                         "if you trust it")
    return cfg


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types here; report one line
        raise UsageError(f"{model_dir}: cannot load the tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batched training/eval need a pad id; masked out everywhere
    return tok


def load_causal_lm(model_dir: str | Path, *, trust_remote_code: bool = False, dtype=None, with_dip: bool = True,
                   attn_implementation: str | None = None):
    """Load a causal LM from safetensors and reattach its DIP projections if it has any."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), use_safetensors=True, trust_remote_code=trust_remote_code,
            dtype=dtype or torch.float32, **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    except (ValueError, RuntimeError, OSError) as exc:
        raise UsageError(f"{model_dir}: cannot load model ({' '.join(str(exc).split())[:300]})") from None
    if with_dip:
        load_dip(model, model_dir)
    return model


def check_vocab(model, tokenizer, where: str) -> None:
    """The tokenizer must fit the model's embedding table."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_emb:
        raise UsageError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {n_emb} rows "
                         "(tokenizer/model mismatch)")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(dst) / name)


def save_model_dir(model, config: DipConfig | None, src_dir: str | Path, out_dir: str | Path, *, dtype=None) -> Path:
    """Save base weights (+ dip/) and tokenizer files into `out_dir`, atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = base_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    copy_tokenizer_files(src_dir, tmp)
    if config is not None and config.method != "none":
        save_dip(model, config, tmp)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def convert(model_dir: str | Path, out_dir: str | Path, config: DipConfig, *, trust_remote_code: bool = False) -> dict:
    """Attach DIP to the model in `model_dir` and save it to `out_dir`. Returns a summary."""
    model = load_causal_lm(model_dir, trust_remote_code=trust_remote_code, with_dip=False)
    if any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        check_vocab(model, load_tokenizer(model_dir, trust_remote_code), str(model_dir))
    family = model_family(model)
    names = attach_dip(model, config)
    save_model_dir(model, config, model_dir, out_dir)
    return {"family": family, "projections": len(names), "method": config.method, "out": str(out_dir)}
