"""`python -m dipnet.eval.vllm_server ARGS`: vLLM's OpenAI-compatible server (same ARGS as
`python -m vllm.entrypoints.openai.api_server`), with the model classes inspected in this
process on a machine without CUDA, as the offline engine does (vllm_runner.inspect_models_in_process):
otherwise the server starts one more `import vllm` in a subprocess before it serves."""

import runpy

from dipnet.eval.vllm_runner import _has_cuda, inspect_models_in_process

if __name__ == "__main__":
    if not _has_cuda():
        inspect_models_in_process()
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
