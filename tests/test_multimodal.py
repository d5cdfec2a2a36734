"""A multimodal checkpoint trained on its text: a tiny random Gemma 3 in the Hub's two-part layout
(Gemma3ForConditionalGeneration: `language_model.model.*`, `vision_tower.*`,
`multi_modal_projector.*`, a processor beside the tokenizer), as Gemma-3-4B ships, taken through
convert -> LoRA + DIP training on text -> export -> evaluation.

vLLM's Gemma3ForConditionalGeneration imports transformers' image processor, which needs
torchvision; the CPU stack has none (PyPI's builds need CUDA and break the CPU torch), so here the
pipeline evaluates on transformers and vLLM must say why it cannot, in one line. With torchvision
(a GPU install) vLLM must serve the export."""

import json
from pathlib import Path

from conftest import cli_in_process, write_recipe


def write_gemma3_multimodal(out: Path, tokenizer_dir: Path) -> Path:
    """Random weights at toy size; the tokenizer is the embedded base's plus Gemma 3's image
    tokens, so the processor vLLM builds for this architecture can be built."""
    import torch
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(str(tokenizer_dir), extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    cfg = T.Gemma3Config(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                              num_attention_heads=2, image_size=32, patch_size=16),
                         mm_tokens_per_image=4, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                         image_token_index=tok.image_token_id)
    torch.manual_seed(0)
    T.Gemma3ForConditionalGeneration(cfg).save_pretrained(str(out), safe_serialization=True)
    T.Gemma3Processor(image_processor=T.Gemma3ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                      image_seq_length=4).save_pretrained(str(out))
    return out


def test_multimodal_gemma3_trains_on_text_exports_and_serves(tmp_path, tiny_base_dir):
    from safetensors import safe_open

    src = write_gemma3_multimodal(tmp_path / "gemma3-mm", tiny_base_dir)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        hub_keys = set(f.keys())
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in hub_keys  # the Hub's layout, not the loaded one
    patch = next(k for k in hub_keys if k.startswith("vision_tower.") and k.endswith("patch_embedding.weight"))
    p = write_recipe(tmp_path, "mm", {
        "model": {"base": str(src)},
        "data": {"synthetic": {"n_train": 64, "n_test": 8}, "max_length": 96},
        "train": {"method": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                  "max_steps": 3, "micro_batch_size": 4, "save_every": 3, "lr": 1e-2, "zero_stage": 2},
        "launch": {"launcher": "single"},
        "eval": {"engine": "hf", "tasks": ["arith-id"], "limit": 8, "max_new_tokens": 8, "eval_base": False},
        "report": {"smoothness": False}})
    res = cli_in_process("run", p, "--only", "base,convert,preprocess,train,export,eval")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "mm"
    export = run / "export" / "main-s0"
    summary = json.loads((export / "export.json").read_text())
    # LoRA targets match by name, so the vision tower's q/v projections got adapters too (2 text
    # blocks + 1 vision block, x 2); no gradient reaches them in text-only training: B stays 0.
    assert summary["lora_merged"] == 3 * 2 and summary["max_logit_diff"] <= summary["tolerance"], summary
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == hub_keys  # every tensor, vision tower included, under the base's own names
        out = {k: f.get_tensor(k) for k in hub_keys}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert not f.get_tensor("language_model.model.layers.0.self_attn.q_proj.weight").equal(
            out["language_model.model.layers.0.self_attn.q_proj.weight"])  # LoRA merged into the text model
        vision = [k for k in hub_keys if k.startswith(("vision_tower.", "multi_modal_projector."))]
        assert patch in vision and all(f.get_tensor(k).equal(out[k]) for k in vision)  # the image side, untouched
    assert json.loads((export / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert (export / "processor_config.json").is_file()  # the processor travels with the tokenizer
    hf = json.loads((run / "eval" / "main-s0" / "results.json").read_text())
    assert hf["engine"] == "hf" and hf["tasks"]["arith-id"]["n"] == 8

    import importlib.util

    res = cli_in_process("eval", export, "--tasks", "arith-id", "--limit", "8", "--max-new-tokens", "8",
                         "--out", tmp_path / "vllm-eval")
    if importlib.util.find_spec("torchvision") is None:
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 1 and len(errors) == 1, res.stderr[-2000:]
        assert "Gemma3ForConditionalGeneration cannot be imported here" in errors[0] and "torchvision" in errors[0]
        assert "--engine hf" in errors[0] and not (tmp_path / "vllm-eval").exists()
    else:
        assert res.returncode == 0, res.stderr[-2000:]
        served = json.loads((tmp_path / "vllm-eval" / "results.json").read_text())
        assert served["engine"] == "vllm" and served["tasks"]["arith-id"]["n"] == 8
        outputs = [json.loads(line)["output"] for line in (run / "eval" / "main-s0" / "samples_arith-id.jsonl")
                   .read_text().splitlines()]
        assert [json.loads(line)["output"] for line in (tmp_path / "vllm-eval" / "samples_arith-id.jsonl")
                .read_text().splitlines()] == outputs  # the same greedy answers as transformers
