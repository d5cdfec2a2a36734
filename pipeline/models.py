"""Reading Hugging Face model directories safely: checks first, then loading.

Every model dipnet reads (a base, a converted or exported model, the directory a checkpoint
names) goes through `check_model_dir` before transformers sees it:
- `config.json` is a JSON object with a `model_type`;
- weights are safetensors only (a pickle-only checkpoint is refused), and every safetensors file
  is structurally sound: its header parses and every tensor's bytes lie inside the file, so a
  truncated or empty file is an error instead of a randomly initialised model;
- a sharded model's index names only plain files in the directory;
- code shipped with the model (`auto_map` in config.json or tokenizer_config.json, or any `*.py`)
  is refused unless the user asked for it (`model.trust_remote_code` / `--trust-remote-code`).
Loading then refuses any weight the files do not provide (transformers would silently
initialise it at random).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.readers import read_json_object

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "preprocessor_config.json", "processor_config.json")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
               "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
MAX_HEADER = 100 * 2**20


def check_safetensors(path: Path) -> int:
    """Validate a safetensors file's structure without loading it; returns its tensor count."""
    return len(safetensors_shapes(path))


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} of a safetensors file, read from its header and checked against its
    size without loading any tensor."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UsageError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER):
                raise UsageError(f"{path}: not a safetensors file or truncated (header of {n} bytes in a "
                                 f"{size}-byte file)")
            header_bytes = f.read(n)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_len = size - 8 - n
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            ok = isinstance(a, int) and isinstance(b, int) and all(isinstance(s, int) and s >= 0 for s in shape)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"{path}: tensor '{name}' has a malformed header entry")
        if not 0 <= a <= b <= data_len:
            raise UsageError(f"{path}: truncated: tensor '{name}' needs bytes {a}-{b} but the file holds {data_len}")
        if dtype in DTYPE_BYTES and (b - a) != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise UsageError(f"{path}: tensor '{name}' has {b - a} bytes, its shape {shape} needs "
                             f"{math.prod(shape) * DTYPE_BYTES[dtype]}")
        shapes[name] = list(shape)
    if not shapes:
        raise UsageError(f"{path}: holds no tensors")
    return shapes


def meta_model(model_dir: str | Path, trust_remote_code: bool = False):
    """The model's architecture without weights (meta device): enough to place projections."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{model_dir}: cannot build the model from config.json "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


def file_key_names(model_dir: str | Path, names: list[str], keys, trust_remote_code: bool = False) -> dict[str, str]:
    """Each parameter name of the loaded model -> the name its weight files use. transformers
    renames some checkpoints' keys while loading (a multimodal Gemma 3's files say
    `language_model.model.layers.*`, the loaded model `model.language_model.layers.*`); its own
    reverse mapping, the one `save_pretrained` writes with, gives the file's name back. A name the
    files already use maps to itself."""
    import torch

    renamed = {n: n for n in names if n in keys}
    rest = [n for n in names if n not in keys]
    if rest:
        try:  # transformers 5's own reverse of its load-time renaming; without it, names stay
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:
            return {**renamed, **{n: n for n in rest}}
        meta = meta_model(model_dir, trust_remote_code)
        for n in rest:
            back = list(revert_weight_conversion(meta, {n: torch.empty(0, device="meta")}))
            renamed[n] = back[0] if len(back) == 1 else n
    return renamed


def check_weights_match(model, files: list[Path], where: Path) -> None:
    """Every parameter of `model` (built from config.json, on the meta device) has a tensor of its
    shape in the weight files, read from their headers: a missing or misshapen weight is found at
    convert, not when training loads it. Names are compared where they agree; transformers renames
    some checkpoints' keys while loading (a multimodal Gemma 3's `language_model.model.*`,
    GPT-NeoX's `embed_out`), so beyond that the check is on shapes: each shape the model needs
    must occur in the files at least as often (tied weights are one parameter)."""
    from collections import Counter

    present = {}
    for f in files:
        present.update(safetensors_shapes(f))
    params: dict[int, tuple[list[str], tuple]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), ([], tuple(p.shape)))[0].append(n)
    for names, shape in params.values():
        for n in names:
            if n in present and tuple(present[n]) != shape:
                raise UsageError(f"{where}: weight '{n}' has shape {present[n]}, config.json implies {list(shape)}")
    have = Counter(tuple(v) for v in present.values())
    need = Counter(shape for _, shape in params.values())
    for shape, count in need.items():
        if have[shape] < count:
            named = [ns for ns, sh in params.values() if sh == shape]
            missing = next((ns[0] for ns in named if not any(n in present for n in ns)), named[0][0])
            raise UsageError(f"{where}: weight '{missing}' (shape {list(shape)}) is missing from the weight files "
                             f"(they hold {have[shape]} tensor(s) of that shape, the model needs {count})")



def weight_files(d: Path) -> list[Path]:
    """The safetensors files a model directory's weights are in (index-listed shards or all)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json_object(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise UsageError(f"{index}: expected a non-empty 'weight_map'")
        names = sorted(set(wm.values()))
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise UsageError(f"{index}: weight_map names {name!r}, expected a file name in {d}")
            if not (d / name).is_file():
                raise UsageError(f"{index}: shard {name} is missing")
        return [d / n for n in names]
    return sorted(p for p in d.glob("*.safetensors") if p.is_file())


def holds_code(d: Path, cfg: dict) -> str | None:
    """Why the directory would make transformers run its code, or None."""
    if cfg.get("auto_map"):
        return "auto_map in config.json"
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        try:
            if json.loads(tc.read_text()).get("auto_map"):
                return "auto_map in tokenizer_config.json"
        except (ValueError, UnicodeDecodeError, AttributeError):
            pass  # load_tokenizer reports a broken tokenizer_config.json itself
    py = sorted(p.name for p in d.glob("*.py"))
    if py:
        return f"Python files ({', '.join(py[:3])})"
    return None


def check_model_dir(model_dir: str | Path, trust_remote_code: bool = False, flag: str = "model.trust_remote_code") -> dict:
    """Validate a model directory before loading; returns its config.json as a dict."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UsageError(f"{d}: no such model directory")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{d}: not a Hugging Face model directory (no config.json)")
    cfg = read_json_object(cfg_path, " of model settings")
    if not isinstance(cfg.get("model_type"), str):
        raise UsageError(f"{cfg_path}: no 'model_type' (not a Hugging Face model config)")
    files = weight_files(d)
    if not files:
        pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if pickles:
            raise UsageError(f"{d}: only pickle checkpoints ({', '.join(sorted(pickles))}); "
                             "dipnet loads safetensors only (convert with safetensors first)")
        raise UsageError(f"{d}: no *.safetensors weights")
    for f in files:
        check_safetensors(f)
    why = holds_code(d, cfg)
    if why and not trust_remote_code:
        raise UsageError(f"{d}: this model needs its own code ({why}); set {flag} if you trust it")
    return cfg


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter directory (`export.merge_lora: false`) and the base it applies to."""
    dir: Path
    base: Path
    rank: int


def read_adapter(model_dir: str | Path, trust_remote_code: bool = False) -> Adapter | None:
    """The adapter in `model_dir` (an adapter_config.json and no config.json), else None. The
    base it names must be a local model directory that passes check_model_dir: a file read here
    never makes dipnet fetch a model or run its code."""
    d = Path(model_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file() or (d / "config.json").is_file():
        return None
    cfg = read_json_object(cfg_path, " of adapter settings")
    if cfg.get("peft_type") != "LORA":
        raise UsageError(f"{cfg_path}: 'peft_type' must be LORA, got {str(cfg.get('peft_type'))[:40]!r}")
    rank, base = cfg.get("r"), cfg.get("base_model_name_or_path")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= 512:
        raise UsageError(f"{cfg_path}: 'r' must be an integer in 1..512, got {str(rank)[:40]}")
    if not isinstance(base, str) or not base or not Path(base).is_dir():
        raise UsageError(f"{cfg_path}: 'base_model_name_or_path' must name a local model directory, "
                         f"got {str(base)[:120]!r}")
    check_model_dir(base, trust_remote_code)
    if not (d / "adapter_model.safetensors").is_file():
        raise UsageError(f"{d}: no adapter_model.safetensors (dipnet loads safetensors only)")
    check_safetensors(d / "adapter_model.safetensors")
    return Adapter(d, Path(base), rank)


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers/hub: dipnet prints its own lines."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # transformers missing: nothing to quiet
        pass


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types here; report one line
        msg = " ".join(str(exc).split())[:200]
        raise UsageError(f"{model_dir}: cannot load the tokenizer ({type(exc).__name__}: {msg})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batched training/eval need a pad id; masked out everywhere
    return tok


def load_causal_lm(model_dir: str | Path, *, trust_remote_code: bool = False, dtype=None, with_dip: bool = True,
                   attn_implementation: str | None = None):
    """Load a causal LM from safetensors (every weight present) and reattach its DIP projections."""
    import torch
    from transformers import AutoModelForCausalLM

    from dipnet.pipeline.dip import load_dip

    check_model_dir(model_dir, trust_remote_code)
    quiet_transformers()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(model_dir), use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True,
            dtype=dtype or torch.float32, **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    except Exception as exc:  # a config transformers cannot build, a tensor it cannot read
        raise UsageError(f"{model_dir}: cannot load model ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
    for kind in ("missing_keys", "mismatched_keys"):
        keys = info.get(kind) or []
        if keys:
            first = sorted(keys)[0] if kind == "missing_keys" else sorted(str(k) for k in keys)[0]
            raise UsageError(f"{model_dir}: the weights do not provide every tensor of the model "
                             f"({len(keys)} {kind.replace('_', ' ')}, e.g. {first})")
    if with_dip:
        load_dip(model, model_dir)
    return model


def check_attn_implementation(name: str, cuda: bool | None = None) -> None:
    """model.attn_implementation: refuse in one line what this machine cannot run."""
    import importlib.util

    if name != "flash_attention_2":
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        raise UsageError("model.attn_implementation flash_attention_2 needs a CUDA GPU, and this machine has none "
                         "(use sdpa or auto)")
    if importlib.util.find_spec("flash_attn") is None:
        raise UsageError("model.attn_implementation flash_attention_2 needs the flash-attn package "
                         "(pip install flash-attn), or use sdpa")


def check_vocab(model, tokenizer, where: str) -> None:
    """The tokenizer must fit the model's embedding table."""
    w = model.get_input_embeddings().weight
    n_emb = tuple(getattr(w, "ds_shape", w.shape))[0]  # a ZeRO-3 partition keeps the full shape in ds_shape
    if len(tokenizer) > n_emb:
        raise UsageError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {n_emb} rows "
                         "(tokenizer/model mismatch)")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file() and not p.is_symlink():
            shutil.copy2(p, Path(dst) / name)
