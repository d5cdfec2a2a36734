"""DeepSpeed's compiled ops (CPU Adam, for optimizer offload): where they are built, and building
them at install time.

`make install` runs this file as a script (`python -P pipeline/ops.py`) in the background while
uv is still installing the rest of the stack and the tiny base pretrains (the build takes 38 s
alone, 87-167 s beside them; the install as a whole 2-4 minutes, docs/testing.md). It
therefore imports nothing but the standard library, torch and deepspeed, which are installed
before it starts."""

import os
import sys
import time
from pathlib import Path


def use_private_extensions_dir() -> None:
    """JIT-built DeepSpeed ops (CPU Adam for offload) go under this environment's prefix, not the
    shared ~/.cache/torch_extensions: two installations (a checkout and a CI clone) otherwise
    rebuild each other's op on every switch (~30 s each, measured). An explicit
    TORCH_EXTENSIONS_DIR wins; a read-only prefix keeps torch's default."""
    if os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def prebuild_ops() -> bool:
    """Build CPU Adam once now, so the first offload run does not stop to compile. False (with a
    note) when it could not be built: offload runs then say so when they need it."""
    use_private_extensions_dir()
    # DeepSpeed's autotuner imports MLflow when it is importable (1.2 s, and during `make install`
    # pip may be writing it right now); nothing here needs it.
    sys.modules.setdefault("mlflow", None)
    t0 = time.time()
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as exc:
        print(f"note: DeepSpeed CPU Adam not prebuilt ({type(exc).__name__}: {str(exc)[:200]})")
        return False
    print(f"DeepSpeed CPU Adam ready in {os.environ['TORCH_EXTENSIONS_DIR']} ({time.time() - t0:.0f} s)")
    return True


if __name__ == "__main__":
    sys.exit(0 if prebuild_ops() else 3)
