"""`dipnet serve MODEL_DIR`: vLLM's OpenAI-compatible server for an exported model.

Binds 127.0.0.1 unless `--host` says otherwise. Runs in the foreground until Ctrl-C/SIGTERM,
which stop the server and every process it started. (`vllm serve` fails in the CPU build, whose
CLI looks up the `vllm` distribution name; the module entry point works in both builds.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from dipnet.eval.vllm_runner import (INSTALL_HINT, MAX_NUM_SEQS_CPU, _has_cuda, kv_cache_bytes, release_socket_dir,
                                     vllm_environment)
from dipnet.pipeline.models import check_model_dir, read_adapter
from dipnet.pipeline.errors import UsageError


def serve_command(model_dir: str | Path, host: str, port: int, max_model_len: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "dipnet.eval.vllm_server", "--model", str(model_dir),
           "--host", host, "--port", str(port), "--served-model-name", Path(model_dir).name]
    if not _has_cuda():
        cmd += ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", str(MAX_NUM_SEQS_CPU)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, workdir: str | None = None) -> int:
    import importlib.util
    import json
    import os

    adapter = read_adapter(model_dir)
    if adapter:
        raise UsageError(f"{model_dir} is a LoRA adapter: serve a merged export (dipnet export without "
                         f"--no-merge-lora), or vLLM's own: vllm serve {adapter.base} --enable-lora --lora-modules "
                         f"NAME={model_dir}")
    check_model_dir(model_dir, flag="(serve never runs model code)")
    if importlib.util.find_spec("vllm") is None:
        raise UsageError(f"engine vllm is not installed: {INSTALL_HINT}")
    from dipnet.launch.local import port_is_free

    if not port_is_free(port, host):  # vLLM would start for a minute, then fail with a traceback
        raise UsageError(f"port {port} on {host} is already in use; choose another with --port")
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    max_len = min(int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048), 4096)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="dipnet-serve-"))
    env = {**os.environ, **vllm_environment(work, kv_cache_bytes(cfg, MAX_NUM_SEQS_CPU * max_len, "float32"))}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine in a child process
    print(f"serving {model_dir} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    proc = subprocess.Popen(serve_command(model_dir, host, port, max_len), env=env, start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        from dipnet.launch.local import kill_group

        kill_group(proc, grace_s=10)
        return 0
    finally:
        release_socket_dir(env["VLLM_RPC_BASE_PATH"])
