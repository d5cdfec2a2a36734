"""The `export` stage: a DeepSpeed checkpoint (any ZeRO stage) -> one Hugging Face model directory.

    dipnet export RUN/train/main-s0 --out DIR          (a train directory or one step-N checkpoint)

1. `read_trainer_state` validates the checkpoint's `trainer_state.json` (it is a file like any
   other: nothing in it turns on remote code; the model directory it names is checked like any
   model directory, and `--base` overrides it).
2. The trained tensors are read lazily from the checkpoint (DeepSpeed's zero_to_fp32 for ZeRO-1/2/3,
   the module file for ZeRO-0). Checkpoints hold only the parameters that trained; every frozen
   one (a LoRA run's base weights, a `dip_fixed` λ) comes from the converted model the run
   started from, and every parameter `trainer_state.json` lists as trained must be present.
3. The output is streamed tensor by tensor into safetensors shards of at most
   `max_shard_bytes` with the base model's own key names (and an index when sharded): LoRA
   adapters are merged into their base weight as W + (alpha/r)·B·A as each weight is written,
   so host memory holds one shard and one weight at a time, never a second model. DIP in
   mean mode is the base architecture, so λ go to `dip/` and every tool reads the rest as is.
4. Checks, inside the temporary directory before it replaces anything: every key and shape of
   the base model is present; plain `transformers` reloads it with no missing, unexpected or
   mismatched key; its logits on a probe batch match the trained model's mean-path logits
   (rebuilt with unmerged adapters) within `export.tolerance` × max(1, max |logit|). Only then
   is the directory swapped in: a failed re-export leaves the previous export untouched.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import re
from pathlib import Path

import torch

from dipnet.pipeline import dip as dipmod
from dipnet.pipeline.checkpoint import (CKPT_PREFIX, checkpoint_problem, read_trainer_state, resolve_checkpoint,
                                        weights_only_torch_load)
from dipnet.pipeline.errors import RunError, UsageError

PROBE_TEXTS = ["Question: Ann has 3 apples. She buys 4 more. How many apples does Ann have now?\nAnswer:",
               "Question: What is 12 + 7?\nAnswer: 12 + 7 = 19\n#### 19"]
MAX_SHARD_BYTES = 2 * 2**30
def trained_tensors(ckpt: Path, zero_stage: int) -> dict:
    """name -> tensor (or DeepSpeed lazy tensor: `.contiguous()` materialises it) of what trained."""
    tag = ckpt.name
    try:
        if zero_stage == 0:
            files = sorted((ckpt / tag).glob("mp_rank_*_model_states.pt"))
            if not files:
                raise UsageError(f"{ckpt / tag}: no mp_rank_*_model_states.pt")
            with weights_only_torch_load():
                sd = torch.load(files[0], map_location="cpu", mmap=True, weights_only=True)
            if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
                raise UsageError(f"{files[0]}: not a DeepSpeed model-states file")
            return sd["module"]
        from dipnet.pipeline.env import import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints and draws progress bars: kept off the console (it is our step, not theirs).
        with weights_only_torch_load(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag, lazy_mode=True)
    except UsageError:
        raise
    except Exception as exc:  # a checkpoint DeepSpeed cannot read: truncated, from another version...
        raise UsageError(f"{ckpt}: cannot read the DeepSpeed checkpoint ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None


def consolidate_zero_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 tensors of every parameter that trained, materialised (tests and small models)."""
    state = read_trainer_state(ckpt)
    return {k: _materialise(v) for k, v in trained_tensors(ckpt, state["zero_stage"]).items()}


def _materialise(t) -> torch.Tensor:
    t = t.contiguous() if not isinstance(t, torch.Tensor) else t
    return t.detach().float().clone()


def hf_key(name: str) -> str:
    """The base model's key for a trained module's parameter name (peft prefixes removed)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


def base_keys(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """key -> (file name, shape) of every tensor in the model directory's safetensors."""
    from dipnet.pipeline.models import safetensors_shapes, weight_files

    return {k: (f.name, shape) for f in weight_files(model_dir) for k, shape in safetensors_shapes(f).items()}


def export_checkpoint(path: str | Path, out_dir: str | Path, *, dtype: str = "float32", tolerance: float = 1e-5,
                      trust_remote_code: bool = False, base: str | Path | None = None,
                      max_shard_bytes: int = MAX_SHARD_BYTES, verify: bool = True, merge_lora: bool = True) -> dict:
    """Consolidate, merge, save and verify. Returns the export summary (also export.json).

    `trust_remote_code` comes only from the caller (the user's flag or recipe), never from the
    checkpoint; `base` overrides the model directory the checkpoint names. `merge_lora` False:
    a LoRA run becomes a PEFT adapter directory for its base instead of merged weights.
    """
    from dipnet.pipeline.models import check_model_dir
    from dipnet.pipeline.outputs import output_dir

    ckpt = resolve_checkpoint(path)
    problem = checkpoint_problem(ckpt)  # before anything in it is read
    if problem:
        others = [p.name for p in sorted(ckpt.parent.glob(f"{CKPT_PREFIX}*")) if p != ckpt and checkpoint_problem(p) is None]
        hint = f"export an intact one: {ckpt.parent / others[-1]}" if others else "no other intact checkpoint beside it"
        raise RunError(f"{ckpt} is damaged ({problem}); {hint}")
    state = read_trainer_state(ckpt)
    recipe = state["recipe_obj"]
    adapter = not merge_lora
    if adapter and recipe.train.method != "lora":
        raise UsageError(f"{ckpt}: export.merge_lora: false (--no-merge-lora) needs a LoRA run; this one is train.method "
                         f"{recipe.train.method}")
    model_dir = Path(base) if base is not None else Path(state["model_dir"])
    check_model_dir(model_dir, trust_remote_code, flag="--trust-remote-code (export)")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    train_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    with output_dir(out_dir, "export", inputs=[ckpt, train_dir, model_dir]) as tmp:
        if adapter:
            written = _write_adapter(ckpt, state, model_dir, tmp, torch_dtype, trust_remote_code)
        else:
            written = _write_weights(ckpt, state, model_dir, tmp, torch_dtype, max_shard_bytes, trust_remote_code)
        summary = {"checkpoint": str(ckpt.resolve()), "step": state["step"], "model_dir": str(model_dir),
                   "out": str(Path(out_dir)), "zero_stage": state["zero_stage"], "train_method": recipe.train.method,
                   "dip_method": recipe.dip.method, "train_precision": recipe.train.precision, "dtype": dtype,
                   **written}
        if verify:
            summary.update(_verify(tmp, state, model_dir, ckpt, dtype, tolerance, trust_remote_code, adapter))
        (tmp / "export.json").write_text(json.dumps(summary, indent=2))
        (tmp / "README.md").write_text(model_card(summary, state, Path(out_dir).name))
    return summary


HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def check_hub_repo(repo: str) -> str:
    if not HUB_REPO.fullmatch(repo) or ".." in repo:
        raise UsageError(f"--push-to-hub: expected a Hub repo id 'namespace/name' (letters, digits, '-', '_', '.'), "
                         f"got {repo[:100]!r}")
    return repo


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload a finished export as the private model repo `repo`; returns its URL. In a child
    process: dipnet runs with HF_HUB_OFFLINE=1 (nothing it loads may reach the Hub), and only
    this explicit request goes online. The token is huggingface_hub's own (HF_TOKEN or its login),
    never printed. A failure leaves the export as it is, complete."""
    import os
    import subprocess
    import sys

    check_hub_repo(repo)
    code = ("import sys\nfrom huggingface_hub import HfApi\napi = HfApi()\n"
            "url = api.create_repo(sys.argv[1], repo_type='model', private=True, exist_ok=True)\n"
            "api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2], ignore_patterns=['.dipnet*'],"
            " commit_message='dipnet export')\nprint(url)")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    p = subprocess.run([sys.executable, "-c", code, repo, str(folder)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        lines = [line.strip() for line in p.stderr.splitlines() if line.strip()]
        token = os.environ.get("HF_TOKEN")
        why = (lines[-1] if lines else f"exit code {p.returncode}")[:300]
        if token:
            why = why.replace(token, "***")
        raise RunError(f"push to {repo} failed ({why}); the export in {folder} is complete: push it again with "
                       f"dipnet export ... --push-to-hub, or `hf upload {repo} {folder}`")
    return p.stdout.strip().splitlines()[-1]


def model_card(summary: dict, state: dict, name: str) -> str:
    """The export's README.md in the Hub's model-card format: YAML metadata (safe_dump: names from
    the recipe cannot break out of it), then what was trained, how, and how to load it."""
    import yaml
    from importlib.metadata import PackageNotFoundError, version

    r = state["recipe_obj"]
    try:
        dipnet_version = version("dipnet")
    except PackageNotFoundError:
        dipnet_version = "unknown"
    base = r.model.base
    adapter = bool(summary.get("adapter"))
    meta = {"library_name": "peft" if adapter else "transformers", "pipeline_tag": "text-generation",
            "tags": ["dipnet", f"dip-method-{r.dip.method}", f"{r.train.method}-fine-tuning"]}
    if base != "tiny" and "/" in base and not Path(base).exists():
        meta["base_model"] = base  # a Hub id; local paths and the built-in tiny base are not
    data = r.data.sources()
    if any(s.path == "gsm8k" or "gsm8k" in Path(s.path).name.lower() for s in data):
        meta["datasets"] = ["openai/gsm8k"]
    flat = lambda v: " ".join(str(v).split()).replace("|", "\\|").replace("`", "'")  # one table cell
    how = (" (LoRA merged into the weights)" if summary.get("lora_merged") else
           f" (a PEFT adapter, r {r.train.lora.r}, α {r.train.lora.alpha}, for {summary['model_dir']})" if adapter else "")
    rows = [("base model", base), ("fine-tuning", r.train.method + how),
            ("DIP method", r.dip.method), ("optimizer steps", state["step"]), ("tokens seen", state["tokens_seen"]),
            ("learning rate", r.train.lr), ("ZeRO stage", state["zero_stage"]), ("precision", r.train.precision),
            ("seed", r.run.seed), ("training data", " + ".join(
                f"{s.path} ({s.format}" + (f", weight {s.weight:g})" if len(data) > 1 else ")") for s in data)), ("exported dtype", summary.get("dtype")),
            ("dipnet", dipnet_version)]
    if r.dip.method in ("dip", "dip_fixed", "input_noise", *dipmod.CONTROLS):
        prior = (("prior κ, λp", f"{r.dip.prior_strength:g} nats, {r.dip.prior_variance:g}") if r.dip.prior_strength
                 else ("prior α, β", f"{r.dip.alpha:g}, {r.dip.beta:g}"))
        rows[3:3] = [("λ0, scale", f"{r.dip.init_variance:g}, {r.dip.scale}"), prior]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {flat(name)}", "",
             f"Fine-tuned from `{flat(base)}` with dipnet (Distributional Input Projection Networks, "
             "arXiv 2506.04690). " + ("This is a LoRA adapter (peft) for the base model named in "
             "`adapter_config.json`; with it the base computes the **mean path**" if adapter else
             "These weights are the **mean path**: the base architecture, loadable by any tool that loads the base "
             "model") + "; the learned input variances λ are kept in `dip/` for DIP-aware sampling.",
             "", "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {flat(v)} |" for k, v in rows]
    lam = summary.get("lambda_mean") or {}
    if lam:
        lines += ["", "## Learned input variances", "", "Mean λ per projection (one λ per feature):", "",
                  "| projection | mean λ |", "|---|---|"]
        lines += [f"| {flat(k)} | {v:.3g} |" for k, v in lam.items()]
    load = (["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
             'model = AutoPeftModelForCausalLM.from_pretrained("PATH")  # loads the base, then the adapter']
            if adapter else ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                             'model = AutoModelForCausalLM.from_pretrained("PATH")'])
    lines += ["", "## Use", "", "```python", *load, 'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", "", "Evaluation: `dipnet eval PATH --tasks gsm8k` writes `results.json` beside its samples; a study's "
              "`report.md` compares this model with its baselines across seeds.", ""]
    return "\n".join(lines)


def _lora_scaling(recipe) -> float:
    return recipe.train.lora.alpha / recipe.train.lora.r


def _split_trained(trained: dict, state: dict, ckpt: Path) -> tuple[dict, dict]:
    """The checkpoint's tensors under the base model's key names: (plain tensors and λ, LoRA
    adapters as {module: {'A': a, 'B': b}}); every parameter the run trained must be there."""
    by_hf: dict[str, object] = {}
    lora: dict[str, dict[str, object]] = {}
    for name, t in trained.items():
        key = hf_key(name)
        m = re.fullmatch(r"(.+)\.lora_([AB])\.[^.]+\.weight", key)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            by_hf[key] = t
    missing = sorted(hf_key(n) for n in state["trainable"]
                     if "lora_" not in n and hf_key(n) not in by_hf)
    if missing:
        raise RunError(f"{ckpt}: the checkpoint lacks trained parameter '{missing[0]}' ({len(missing)} missing)")
    for mod, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise RunError(f"{ckpt}: LoRA of '{mod}' has only lora_{''.join(ab)}")
    return by_hf, lora


def _write_adapter(ckpt: Path, state: dict, model_dir: Path, out: Path, torch_dtype, trust_remote_code: bool) -> dict:
    """A PEFT adapter directory (export.merge_lora: false): adapter_config.json and
    adapter_model.safetensors under peft's own key names, for the base model the run started
    from (whose mean path is the base architecture); tokenizer files and λ beside them."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers.pytorch_utils import Conv1D

    from dipnet.pipeline.models import copy_tokenizer_files, file_key_names, meta_model

    recipe = state["recipe_obj"]
    trained = trained_tensors(ckpt, state["zero_stage"])
    by_hf, lora = _split_trained(trained, state, ckpt)
    other = sorted(k for k in by_hf if not dipmod.is_dip_key(k))
    if other:
        raise RunError(f"{ckpt}: '{other[0]}' trained outside the LoRA adapters, which an adapter cannot carry; "
                       "export merged (export.merge_lora: true)")
    keys = base_keys(model_dir)
    # The adapter keeps the loaded model's module names (peft applies it to that model); the
    # files' names only check that each module is one of the base's.
    in_files = file_key_names(model_dir, [m + ".weight" for m in lora], keys, trust_remote_code)
    unknown = sorted(m + ".weight" for m in lora if in_files[m + ".weight"] not in keys)
    if unknown:
        raise RunError(f"{ckpt}: '{unknown[0]}' is not a tensor of the base model {model_dir} ({len(unknown)} unexpected)")
    meta = meta_model(model_dir, trust_remote_code)
    conv1d = {n for n, mod in meta.named_modules() if isinstance(mod, Conv1D)}
    del meta
    tensors = {f"base_model.model.{mod}.lora_{x}.weight": _materialise(ab[x]).to(torch_dtype).contiguous()
               for mod, ab in sorted(lora.items()) for x in "AB"}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    lc = recipe.train.lora
    LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=sorted(lc.target_modules),
               task_type="CAUSAL_LM", fan_in_fan_out=bool(conv1d & set(lora)),
               base_model_name_or_path=str(model_dir.resolve())).save_pretrained(str(out))
    copy_tokenizer_files(model_dir, out)
    lam = _write_lambda(ckpt, state, model_dir, out, by_hf, trust_remote_code)
    trained.clear()
    return {"adapter": True, "lora_modules": len(lora), "tensors": len(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "dip_projections": len(lam),
            "lambda_mean": {k: float(v.float().exp().mean()) for k, v in sorted(lam.items())}}


def _drop_tied_aliases(by_hf: dict, keys: dict, model_dir: Path, trust_remote_code: bool) -> None:
    """A tied weight (lm_head = embed_tokens in Gemma, SmolLM2) trains as one tensor, but a full
    fine-tune's ZeRO-3 checkpoint names it under both names; the base's files hold it once. The
    name the files lack is dropped: its tensor is written under the other."""
    from dipnet.pipeline.models import file_key_names, meta_model

    meta = meta_model(model_dir, trust_remote_code)
    groups: dict[int, list[str]] = {}
    for n, p in meta.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    del meta
    for group in (g for g in groups.values() if len(g) > 1):
        in_files = list(file_key_names(model_dir, group, keys, trust_remote_code).values())
        if any(f in keys for f in in_files):
            for f in in_files:
                if f not in keys:
                    by_hf.pop(f, None)


def _write_weights(ckpt: Path, state: dict, model_dir: Path, out: Path, torch_dtype, max_shard_bytes: int,
                   trust_remote_code: bool) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dipnet.pipeline.models import copy_tokenizer_files, file_key_names, meta_model

    recipe = state["recipe_obj"]
    trained = trained_tensors(ckpt, state["zero_stage"])
    by_hf, lora = _split_trained(trained, state, ckpt)

    keys = base_keys(model_dir)
    # Written under the names the base's files use (a multimodal Gemma 3 loads under other names).
    names = file_key_names(model_dir, [k for k in by_hf if not dipmod.is_dip_key(k)] + [m + ".weight" for m in lora],
                           keys, trust_remote_code)
    by_hf = {names.get(k, k): v for k, v in by_hf.items()}
    lora = {names[m + ".weight"][:-len(".weight")]: ab for m, ab in lora.items()}
    conv1d = set()
    if lora:  # GPT-2's Conv1D stores W transposed: its LoRA delta is too (peft's fan_in_fan_out)
        from transformers.pytorch_utils import Conv1D

        meta = meta_model(model_dir, trust_remote_code)
        conv1d = {names.get(n + ".weight", n + ".weight")[:-len(".weight")]
                  for n, mod in meta.named_modules() if isinstance(mod, Conv1D)}
        del meta
    if any(k not in keys and not dipmod.is_dip_key(k) for k in by_hf):
        _drop_tied_aliases(by_hf, keys, model_dir, trust_remote_code)
    unknown = sorted(k for k in by_hf if k not in keys and not dipmod.is_dip_key(k))
    unknown += sorted(m + ".weight" for m in lora if m + ".weight" not in keys)
    if unknown:
        raise RunError(f"{ckpt}: '{unknown[0]}' is not a tensor of the base model {model_dir} "
                       f"({len(unknown)} unexpected)")
    scaling = _lora_scaling(recipe) if lora else 0.0
    shards, current, size, weight_map, total = [], {}, 0, {}, 0
    handles: dict[str, object] = {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(out / name), metadata={"format": "pt"})
            shards.append(name)
            for k in current:
                weight_map[k] = name
            current, size = {}, 0

    try:
        for key, (fname, shape) in keys.items():
            if key in by_hf:
                w = _materialise(by_hf[key])
            else:
                if fname not in handles:
                    handles[fname] = safe_open(str(model_dir / fname), framework="pt")
                w = handles[fname].get_tensor(key).float()
            mod = key[:-len(".weight")] if key.endswith(".weight") else None
            if mod in lora:
                a, b = _materialise(lora[mod]["A"]), _materialise(lora[mod]["B"])
                delta = (b @ a) * scaling
                w = w + (delta.T if mod in conv1d else delta)
            if list(w.shape) != list(shape):
                raise RunError(f"{ckpt}: '{key}' has shape {list(w.shape)}, the base model has {shape}")
            w = w.to(torch_dtype).contiguous()
            nbytes = w.numel() * w.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[key] = w
            size += nbytes
            total += nbytes
        flush()
    finally:
        handles.clear()
    if len(shards) == 1:
        (out / shards[0]).rename(out / "model.safetensors")
    else:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    # config (with the exported dtype), tokenizer, generation config, then λ into dip/.
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = str(torch_dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    copy_tokenizer_files(model_dir, out)
    lam = _write_lambda(ckpt, state, model_dir, out, by_hf, trust_remote_code)
    trained.clear()
    gc.collect()
    return {"tensors": len(keys), "shards": len(shards), "bytes": total, "lora_merged": len(lora),
            "dip_projections": len(lam),
            "lambda_mean": {k: float(v.float().exp().mean()) for k, v in sorted(lam.items())}}


def _write_lambda(ckpt: Path, state: dict, model_dir: Path, out: Path, by_hf: dict, trust_remote_code: bool) -> dict:
    """λ into out/dip/ (ln λ per projection, returned)."""
    from dipnet.pipeline.models import meta_model

    # λ: the run's own DIP settings (what train.py attached); trained values from the checkpoint,
    # frozen ones (dip_fixed, input_noise) as the run started: from model_dir/dip when the run
    # loaded them from there, else their initial value.
    dip_config = dipmod.dip_config_from_dict(state["dip_config"], str(ckpt / "trainer_state.json"))
    lam = {}
    if dip_config.method not in ("none", "neftune"):
        meta = meta_model(model_dir, trust_remote_code)
        dipmod.attach_dip(meta, dip_config)
        lam = dipmod.initial_dip_state(meta)
        base_log = {dipmod._short(n): p.base_log_variance for n, p in dipmod.projections(meta)}
        del meta
        saved_cfg = dipmod.read_dip_config(model_dir)
        if saved_cfg is not None and dipmod.same_noise(saved_cfg, dip_config):
            lam.update({k: v for k, v in dipmod.read_dip_state(model_dir).items() if k in lam})
        trained_lam = {dipmod.short_name(k): v for k, v in by_hf.items() if dipmod.is_dip_key(k)}
        unknown_lam = sorted(set(trained_lam) - set(lam))
        if unknown_lam:
            raise RunError(f"{ckpt}: λ '{unknown_lam[0]}' matches no projection of the run's DIP settings")
        lam.update({k: base_log[k] + _materialise(v) for k, v in trained_lam.items()})  # ln λ = ln λ0 + offset
    if dip_config.method != "none":
        dipmod.save_dip(None, dip_config, out, state={k: v.float().contiguous() for k, v in lam.items()})
    return lam


def _load_adapter(out: Path, model_dir: Path, dtype) -> tuple[object, dict]:
    """peft's own loader: the base model, then the adapter; (model, {kind: keys} that did not match)."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model = PeftModel.from_pretrained(base, str(out))
    loaded, saved = get_peft_model_state_dict(model), load_file(str(out / "adapter_model.safetensors"))
    problems = {"missing_keys": sorted(set(saved) - set(loaded)), "unexpected_keys": sorted(set(loaded) - set(saved)),
                "mismatched_keys": sorted(k for k in set(saved) & set(loaded) if not torch.equal(saved[k], loaded[k]))}
    return model, {k: v for k, v in problems.items() if v}


def _probe_logits(model, tokenizer) -> torch.Tensor:
    tokenizer.padding_side = "right"
    batch = tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits.float()
    return logits * batch["attention_mask"].unsqueeze(-1)


def _verify(out: Path, state: dict, model_dir: Path, ckpt: Path, dtype: str, tolerance: float,
            trust_remote_code: bool, adapter: bool = False) -> dict:
    """Reload the written directory as any tool would (an adapter: peft onto its base), then
    compare logits with the trained model."""
    from transformers import AutoModelForCausalLM

    from dipnet.pipeline.models import load_tokenizer, quiet_transformers
    from dipnet.pipeline.model_setup import setup_model

    quiet_transformers()
    # Compare in the export's dtype: bf16 against bf16 keeps each side to one model in memory.
    load_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    if adapter:
        plain, problems = _load_adapter(out, model_dir, load_dtype)
    else:
        plain, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=load_dtype)
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        kind, keys = next(iter(problems.items()))
        raise RunError(f"export {out}: {kind.replace('_', ' ')}: {sorted(map(str, keys))[0]}")
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    exported = _probe_logits(plain, tokenizer)
    n_params = sum(p.numel() for p in plain.parameters())
    del plain
    gc.collect()

    recipe = state["recipe_obj"]
    model, _ = setup_model(recipe, str(model_dir), trust_remote_code=trust_remote_code, dtype=load_dtype)
    lazy = trained_tensors(ckpt, state["zero_stage"])
    expected = model.state_dict()
    bad = sorted(k for k in lazy if k not in expected)
    if bad:
        raise RunError(f"{ckpt}: checkpoint tensor '{bad[0]}' is not in the trained model ({len(bad)} unexpected)")
    # One trained tensor in float32 at a time: the peak is the model once (in the export's dtype)
    # plus the largest tensor, not a second float32 copy of every trained weight.
    with torch.no_grad():
        for k in list(lazy):
            v = _materialise(lazy[k])
            if v.shape != expected[k].shape:
                raise RunError(f"{ckpt}: '{k}' has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
            expected[k].copy_(v)
            del v
    del lazy
    dipmod.set_dip_mode(model, "mean")
    reference = _probe_logits(model, tokenizer)
    del model
    gc.collect()
    max_diff = (exported - reference).abs().max().item()
    # Relative to the logits' scale: a merged LoRA computes x·(W + s·BA) instead of
    # x·W + s·(x·A)·B, which moves float32 logits of magnitude ~10 by ~1e-5.
    scale = max(1.0, reference.abs().max().item())
    tol = (tolerance if dtype == "float32" else max(tolerance, 5e-2)) * scale
    if not max_diff <= tol:
        raise RunError(f"export {out}: logits differ from the trained mean path by {max_diff:.3g} (> {tol:g}); "
                       "nothing was replaced")
    return {"parameters": n_params, "max_logit_diff": max_diff, "logit_scale": scale, "tolerance": tol}
