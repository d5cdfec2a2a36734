"""Real 2-rank DeepSpeed runs on the tiny base: ZeRO-1/2/3 agreement, λ under ZeRO-3,
checkpoints, kill -9 and resume, LoRA + DIP, export round trip, EOS."""

import json
import os
import re

import pytest
import torch
from conftest import built_for_the_session
from trainhelp import metrics, train, train_many

from dipnet.pipeline.errors import RunError
from dipnet.pipeline.export import consolidate_zero_checkpoint, export_checkpoint
from dipnet.pipeline.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

STEPS = {"train.max_steps": 8, "train.save_every": 4, "train.keep_last": 2}


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """ZeRO-1, 2 and 3 one after another in one launch (as a study's runs are trained)."""
    root = built_for_the_session(tmp_path_factory, "zero", lambda d: train_many(
        {d / f"z{stage}": {**STEPS, "train.zero_stage": stage, "dip.method": "dip", "dip.lr_scale": 50.0}
         for stage in (1, 2, 3)}))
    return {stage: root / f"z{stage}" for stage in (1, 2, 3)}


def test_zero_stages_train_and_agree(zero_runs):
    per = {s: metrics(out) for s, out in zero_runs.items()}
    for s, rows in per.items():
        assert rows[-1]["nll"] < rows[0]["nll"] - 0.5, (s, rows[0]["nll"], rows[-1]["nll"])  # loss falls
        last = rows[-1]["lambda"]["0.dip_input"]
        assert abs(last["mean"] - 0.01) > 1e-5 or last["max"] - last["min"] > 1e-4  # λ moved
        ck = zero_runs[s] / "checkpoints"
        assert sorted(p.name for p in ck.glob("step-*")) == ["step-000004", "step-000008"]
        assert (ck / "latest").read_text() == "step-000008"
    # ZeRO-1/2/3 losses agree over the first steps. ZeRO-1 and 2 are bit-identical; ZeRO-3's
    # reduce-scatter sums in another order, and Adam's first steps move each weight by about ±lr
    # whatever its gradient's size, so a near-zero gradient whose sign that order flips moves the
    # loss: 1.4e-5 at step 1 on one tiny base, under 1e-5 on another (the base's pretraining differs
    # between builds). Training λ at the base lr instead of 50× (a lost param group) moves it 1.3e-2.
    for step in range(3):
        ref = per[1][step]["loss"]
        for s in (2, 3):
            assert abs(per[s][step]["loss"] - ref) <= 1e-4, (s, step, per[s][step]["loss"], ref)


def test_lambda_under_zero3_equals_zero1(zero_runs):
    w1 = consolidate_zero_checkpoint(latest_checkpoint(zero_runs[1] / "checkpoints"))
    w3 = consolidate_zero_checkpoint(latest_checkpoint(zero_runs[3] / "checkpoints"))
    keys = [k for k in w1 if "log_variance" in k]
    assert len(keys) == 4 and set(keys) <= set(w3)
    for k in keys:  # log-variance offsets from ln(0.01): 0 at the start
        assert w3[k].shape == (128,)
        moved = w1[k].abs().max().item()
        off = ((w1[k] - w3[k]).norm() / w1[k].norm()).item()
        # λ trained (moved ~0.1-0.5 in log-variance) and ZeRO-3 agrees with ZeRO-1 up to the
        # reduction-order drift the losses show: 0.07-0.19% of λ's movement (as a norm; one feature
        # whose update sign flipped differs by 0.002). A λ left uninitialised or lost under
        # partitioning would be off by the whole movement; trained at the base lr, by 98%.
        assert moved > 0.05, (k, moved)
        assert off < 0.01, (k, off, moved)


def test_export_round_trip_every_stage(zero_runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dipnet.pipeline import dip
    from dipnet.pipeline.models import load_causal_lm

    for s, out in zero_runs.items():
        summary = export_checkpoint(out, tmp_path / f"export{s}")
        assert summary["max_logit_diff"] == 0.0 and summary["tensors"] == 39 and summary["dip_projections"] == 4
    d = tmp_path / "export3"
    assert not any(p.name.startswith("dip") for p in d.glob("*.safetensors"))
    # The model card: Hub metadata, what was trained and how, and the learned λ beside the saved ones.
    import yaml

    card = (d / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "dipnet" in meta["tags"] and "base_model" not in meta
    assert "| ZeRO stage | 3 |" in body and "| optimizer steps | 8 |" in body and "| DIP method | dip |" in body
    saved = dip.read_dip_state(d)
    means = json.loads((d / "export.json").read_text())["lambda_mean"]
    assert len(means) == 4 and all(abs(means[k] - saved[k].float().exp().mean().item()) < 1e-6 * means[k] for k in means)
    assert all(f"| {k} | {v:.3g} |" in body for k, v in means.items())
    plain = AutoModelForCausalLM.from_pretrained(d).eval()
    with_dip = load_causal_lm(d)
    dip.set_dip_mode(with_dip, "mean")
    tok = AutoTokenizer.from_pretrained(d)
    x = tok(["Question: Ann has 3 pens.\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plain(**x).logits, with_dip.eval()(**x).logits)
    w3 = consolidate_zero_checkpoint(latest_checkpoint(zero_runs[3] / "checkpoints"))
    for name, p in dip.projections(with_dip):
        key = next(k for k in w3 if k.endswith(name.split("model.", 1)[-1] + ".log_variance_offset"))
        # ln λ = ln λ0 + offset is exported as ln λ: equal up to one float32 rounding.
        assert (p.log_variance.detach() - (w3[key] + p.base_log_variance)).abs().max() <= 1e-6


KILL_CFG = {"train.max_steps": 12, "train.save_every": 4, "train.zero_stage": 2, "dip.method": "dip"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final trained tensors of an uninterrupted KILL_CFG run: what every resume must reach."""
    ref = built_for_the_session(tmp_path_factory, "uninterrupted", lambda d: train(d / "ref", KILL_CFG)) / "ref"
    return consolidate_zero_checkpoint(latest_checkpoint(ref / "checkpoints"))


def _assert_same_weights(a, run):
    b = consolidate_zero_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert set(a) == set(b)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff


def test_kill_one_rank_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    run = tmp_path / "killed"
    with pytest.raises(RunError, match="training failed"):
        train(run, KILL_CFG, env={"DIPNET_FAULT_KILL": "1:7"})  # rank 1 SIGKILLs itself mid-step 7
    assert (run / "checkpoints" / "latest").read_text() == "step-000004"
    _no_rank_alive(run)
    # The rerun resumes from step 4, as a Slurm job whose USR1 margin is far shorter than a save.
    train(run, KILL_CFG, env={"DIPNET_SIGNAL_MARGIN_S": "0.001"})
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "step-000004" in log
    _assert_same_weights(uninterrupted, run)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["checkpoint_save_s"] > 0 and summary["checkpoint_bytes"] > 0, summary
    assert re.search(r"checkpoint step-000012 saved in [\d.]+ s \([\d.]+ GB\)", log), log[-2000:]
    assert "more than half of the job's 0 s USR1 margin" in log and "raise launch.slurm.signal_margin_s" in log


def test_a_rotten_checkpoint_is_set_aside_and_resume_falls_back(tmp_path, uninterrupted):
    """One bit flips in a rank's optimizer shard of the latest checkpoint (same size, so only the
    checksum can tell): export refuses it and names the intact one; resume sets it aside, says so
    in one line, resumes from the checkpoint before it and ends on the uninterrupted weights."""
    run = tmp_path / "rot"
    with pytest.raises(RunError, match="training failed"):
        train(run, KILL_CFG, env={"DIPNET_FAULT_KILL": "0:11"})
    ck = run / "checkpoints"
    assert (ck / "latest").read_text() == "step-000008" and (ck / "step-000004").is_dir()
    sums = json.loads((ck / "step-000008" / "checksums.json").read_text())["files"]
    shards = [f for f in sorted(sums) if "optim_states" in f]
    assert "trainer_state.json" in sums and len(shards) == 2, sorted(sums)  # ZeRO-2: one per rank
    shard = ck / "step-000008" / shards[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(data)
    with pytest.raises(RunError, match=r"step-000008 is damaged \(.*optim_states.* another SHA-256.*\); "
                                       r"export an intact one: .*step-000004"):
        export_checkpoint(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    train(run, KILL_CFG)
    log = (run / "train.log").read_text()
    assert "checkpoint step-000008 is damaged" in log and "set aside as .damaged-step-000008" in log
    assert "resuming from step-000004, the latest intact checkpoint" in log
    assert (ck / ".damaged-step-000008" / shards[1]).read_bytes() == bytes(data)  # kept, not deleted
    _assert_same_weights(uninterrupted, run)


def _no_rank_alive(run):
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace")
                state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            assert not (str(run) in cmd and "dipnet.pipeline.train" in cmd and state != "Z"), f"rank still running: {d} {cmd}"


def test_resume_on_another_world_size_through_a_universal_checkpoint(tmp_path):
    """2 ranks stop after step 3 (a rank dies in step 4); 1 rank resumes from DeepSpeed's universal
    form of that checkpoint. The global batch is fixed, so steps 4-6 see the same examples, and
    their losses match an uninterrupted 2-rank run's (float summation order differs)."""
    cfg = {"train.max_steps": 6, "train.save_every": 3, "train.zero_stage": 2, "dip.method": "none",
           "train.global_batch_size": 8, "train.micro_batch_size": 4}
    ref = tmp_path / "ref"
    train(ref, cfg)
    run = tmp_path / "ws"
    with pytest.raises(RunError, match="training failed"):
        train(run, cfg, env={"DIPNET_FAULT_KILL": "0:4"})
    assert (run / "checkpoints" / "latest").read_text() == "step-000003"
    train(run, cfg, procs=1)
    log = (run / "train.log").read_text()
    assert "resuming 2-rank checkpoint step-000003 on 1 ranks (universal checkpoint)" in log
    a = {r["step"]: r["loss"] for r in metrics(ref)}
    b = {r["step"]: r["loss"] for r in metrics(run)}  # later lines (the resumed run) win
    assert [s for s in b if s > 3] == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    assert json.loads((run / "train_summary.json").read_text())["world_size"] == 1


def test_nan_loss_stops_with_step_and_keeps_last_good(tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(RunError, match=r"non-finite loss at step 3; stopped without saving \(last good checkpoint: step-000002\)"):
        train(run, {"train.max_steps": 6, "train.save_every": 2, "train.zero_stage": 1}, env={"DIPNET_FAULT_NAN": "3"})
    assert (run / "checkpoints" / "latest").read_text() == "step-000002"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Four steps of LoRA + DIP on 2 ranks, ZeRO-2."""
    cfg = {"train.max_steps": 4, "train.save_every": 4, "train.zero_stage": 2, "train.method": "lora",
           "dip.method": "dip", "dip.lr_scale": 5.0, "train.lora.r": 4, "train.lr": 2e-2}
    return built_for_the_session(tmp_path_factory, "lora", lambda d: train(d / "lora", cfg)) / "lora"


def test_lora_with_dip_trains_and_merges(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    w = consolidate_zero_checkpoint(latest_checkpoint(lora_run / "checkpoints"))
    assert any("lora_A" in k for k in w) and sum("log_variance" in k for k in w) == 4
    lam = [v for k, v in w.items() if "log_variance" in k]
    assert any(not torch.allclose(v, torch.zeros_like(v)) for v in lam)  # λ trained (offsets moved from 0)
    s = export_checkpoint(lora_run, tmp_path / "lora_export")
    assert s["max_logit_diff"] <= 1e-5 * s["logit_scale"]
    m, info = AutoModelForCausalLM.from_pretrained(tmp_path / "lora_export", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not any("lora" in k for k in m.state_dict())


def test_lora_exports_as_a_peft_adapter_that_vllm_evaluates(lora_run, tmp_path):
    """export.merge_lora: false: a PEFT adapter directory that peft loads onto its base with the
    trained logits, and that dipnet eval runs through vLLM's LoRA support with the merged
    export's answer NLL (and not the base's)."""
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    from dipnet.eval.evaluate import evaluate_model
    from dipnet.eval.serve import serve
    from dipnet.pipeline.errors import UsageError
    from dipnet.pipeline.export import PROBE_TEXTS

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    export_checkpoint(lora_run, merged)
    s = export_checkpoint(lora_run, adapter, merge_lora=False)
    assert s["adapter"] and s["lora_modules"] == 4 * 4 and s["max_logit_diff"] <= s["tolerance"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "export.json", "tokenizer.json",
            "dip"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "config.json").exists() and (adapter / "dip" / "dip.safetensors").is_file()
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith(("lora_A.weight", "lora_B.weight"))
               for k in load_file(adapter / "adapter_model.safetensors"))
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "AutoPeftModelForCausalLM" in card
    # peft's own loader, as a user would call it, against the merged weights.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    batch = tok(PROBE_TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        via_peft = AutoPeftModelForCausalLM.from_pretrained(adapter)(**batch).logits
        via_merge = AutoModelForCausalLM.from_pretrained(merged)(**batch).logits
    assert (via_peft - via_merge).abs().max() <= 1e-4
    # dipnet eval: the adapter through vLLM, the merged model and the base through transformers.
    kw = dict(limit=8, max_new_tokens=24, progress=False)
    with pytest.raises(UsageError, match="is a LoRA adapter: serve a merged export"):
        serve(adapter, port=0)
    runs = {name: evaluate_model(d, ["arith-id"], tmp_path / f"ev_{name}", engine=engine, **kw)["tasks"]["arith-id"]
            for name, d, engine in [("adapter", adapter, "vllm"), ("merged", merged, "hf"), ("base", s["model_dir"], "hf")]}
    outputs = {name: [json.loads(l)["output"] for l in (tmp_path / f"ev_{name}" / "samples_arith-id.jsonl").open()]
               for name in runs}
    print({name: (r["teacher_forced"]["answer_nll"], r["teacher_forced"]["engine"]) for name, r in runs.items()})
    assert outputs["adapter"] == outputs["merged"] != outputs["base"]  # vLLM applied the adapter, greedy for greedy
    nll = {name: r["teacher_forced"]["answer_nll"] for name, r in runs.items()}
    assert abs(nll["adapter"] - nll["merged"]) <= 1e-5 * max(1.0, nll["merged"]) < abs(nll["adapter"] - nll["base"])


def test_lora_target_that_matches_nothing(tmp_path):
    with pytest.raises(RunError, match="train.lora.target_modules: 'qkv_proj' matches no module"):
        train(tmp_path / "bad", {"train.max_steps": 1, "train.method": "lora", "train.lora.target_modules": ["qkv_proj"],
                                  "launch.launcher": "single"}, procs=1)


def test_finetuned_model_emits_eos(exported):
    """Fine-tuning teaches the model to end its answer (the shared 60-step run's export)."""
    from dipnet.eval.hf_runner import greedy_generate, load_hf
    from dipnet.eval.tasks import build_task

    model, tok = load_hf(exported)
    task = build_task("arith-id", limit=32)
    prompts = [tok(task.prompt(i)).input_ids for i in range(len(task.problems))]
    gens = greedy_generate(model, tok, prompts, 64, stops=[])
    stopped = sum(len(g[1]) < 64 for g in gens)
    assert stopped == len(gens), f"{len(gens) - stopped} generations ran to the limit without EOS"


METHODS = ["none", "input_noise", "neftune", "dip_fixed", "dip"]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    """Three steps of every noise method, in one single-process launch."""
    root = built_for_the_session(tmp_path_factory, "methods", lambda d: train_many(
        {d / m: {"train.max_steps": 3, "train.save_every": 3, "train.zero_stage": 1, "dip.method": m,
                 "launch.launcher": "single", **({"dip.trajectories": 2, "dip.gamma": 0.01} if m == "dip" else {})}
         for m in METHODS}, procs=1))
    return {m: root / m for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_few_steps(method_runs, method):
    rows = metrics(method_runs[method])
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)  # finite, logged every step
    lam = rows[-1]["lambda"]
    if method in ("none", "neftune"):
        assert lam == {}
    elif method == "input_noise":
        assert list(lam) == ["0.dip_input"] and lam["0.dip_input"]["mean"] == pytest.approx(0.01, rel=1e-5)
    elif method == "dip_fixed":
        assert all(v["mean"] == pytest.approx(0.01, rel=1e-5) for v in lam.values())
    else:
        assert rows[-1]["var_penalty"] > 0 and rows[-1]["tokens"] == 2 * rows[-1]["tokens"] // 2
        assert any(abs(v["mean"] - 0.01) > 1e-7 for v in lam.values())


def test_zero3_offload_with_cpu_adam(tmp_path, zero_runs):
    """Optimizer + parameter offload (DeepSpeed CPU Adam, compiled on first use, ~1 min cold)."""
    run = tmp_path / "offload"
    train(run, {**STEPS, "train.max_steps": 4, "train.zero_stage": 3, "train.offload": True, "dip.method": "dip",
                "dip.lr_scale": 50.0}, timeout=900)
    rows = metrics(run)
    assert abs(rows[0]["loss"] - metrics(zero_runs[1])[0]["loss"]) <= 1e-5  # same first step as ZeRO-1
    assert "offload: optimizer DeepSpeedCPUAdam, ZeRO-3 + offload, 2 ranks" in (run / "train.log").read_text()
    s = export_checkpoint(run, tmp_path / "offload_export")
    assert s["max_logit_diff"] == 0.0 and s["dip_projections"] == 4


def _hand_step(base, examples, pad, r, *, rho: float | None, world: int = 2) -> dict[str, torch.Tensor]:
    """One AdamW step computed by hand, as data-parallel SAM defines it when rho is set:
    g = ∇ of the mean token NLL over every rank's batch at w, e = ρ·g/‖g‖, update with the same
    gradient at w + e."""
    from transformers import AutoModelForCausalLM

    from dipnet.pipeline.data import batch_indices, collate
    from dipnet.pipeline.dip import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    w0 = {k: p.detach().clone() for k, p in params.items()}
    batches = [collate([examples[i] for i in batch_indices(len(examples), r.run.seed, 0, r.train.micro_batch_size, 1,
                                                           rank, world)[0]], pad) for rank in range(world)]
    counted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    def mean_grad():
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = -token_logprobs(logits, b["labels"])[0].sum() / counted
            for k, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if g is not None:
                    grads[k] += g
        return grads

    g = mean_grad()
    if rho is not None:
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g.values())).item()
        with torch.no_grad():
            for k, p in params.items():
                p.add_(g[k] * (rho / (norm + 1e-12)))
        g = mean_grad()
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(w0[k])
    opt = torch.optim.AdamW(list(params.values()), lr=r.train.lr, betas=(0.9, 0.95), weight_decay=0.0)
    for k, p in params.items():
        p.grad = g[k]
    opt.step()
    return {k: p.detach().clone() for k, p in params.items()}


def test_sam_step_equals_hand_computed(tmp_path):
    """train.optimizer: sam on 2 ranks (ZeRO-2) takes exactly the hand-computed SAM step, and
    that step is measurably not the plain AdamW step."""
    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.data import TokenizedExamples, preprocess
    from dipnet.pipeline.models import load_tokenizer

    run = tmp_path / "sam"
    over = {"train.max_steps": 1, "train.save_every": 1, "train.zero_stage": 2, "dip.method": "none",
            "train.optimizer": "sam", "train.sam_rho": 0.5, "train.grad_clip": 0.0, "train.warmup_steps": 0,
            "train.lr": 1e-3}
    r = train(run, over)
    base = tiny_base(r.model.tiny, progress=False)
    examples = TokenizedExamples(preprocess(r.data, base, run.parent / "_preprocessed")["path"])
    pad = load_tokenizer(base).pad_token_id
    trained = consolidate_zero_checkpoint(latest_checkpoint(run / "checkpoints"))
    sam = _hand_step(base, examples, pad, r, rho=0.5)
    plain = _hand_step(base, examples, pad, r, rho=None)
    keys = [k for k in trained if k in sam]
    assert len(keys) == len(sam)
    d_sam = torch.cat([(trained[k] - sam[k]).abs().flatten() for k in keys])
    d_plain = torch.cat([(trained[k] - plain[k]).abs().flatten() for k in keys])
    # Adam's first step moves each weight by ~lr·sign(g): equal steps agree to float noise except
    # where a gradient is ~0 and rounding decides its sign (measured: 0.4% of weights, mostly
    # output-layer rows of unused tokens); the plain AdamW step differs in ~45% of them.
    assert (d_sam > 1e-6).float().mean().item() < 0.01, d_sam.max()
    assert (d_plain > 1e-4).float().mean().item() > 0.2


def test_sam_refuses_a_full_fine_tune_beyond_its_memory_limit():
    """SAM's per-rank copies (~10 bytes per trainable parameter) would fill a GPU at 7B: refused in
    one line; LoRA on the same model (adapters only) and small models pass."""
    from dipnet.pipeline.train import check_sam_size

    with pytest.raises(RunError, match=r"train.optimizer sam: 7.6B trainable parameters.*use train.method lora"):
        check_sam_size(7_600_000_000)
    check_sam_size(40_000_000)  # Qwen2.5-7B's LoRA adapters at r 16 on every projection


def test_sam_refuses_zero3():
    from dipnet.pipeline.recipe import Recipe, apply_overrides

    with pytest.raises(Exception, match="train.optimizer sam needs train.zero_stage 0, 1 or 2"):
        Recipe.model_validate(apply_overrides({}, {"train.optimizer": "sam", "train.zero_stage": 3}))


CKPT_CASES = [(stage, method) for stage in (2, 3) for method in ("full", "lora")]


@pytest.fixture(scope="module")
def checkpointing_runs(tmp_path_factory):
    """ZeRO-2/3 x full/LoRA, DIP with 2 trajectories, each with and without gradient checkpointing,
    plus eager attention: one launch of 2 ranks."""
    base = {"train.max_steps": 3, "train.save_every": 3, "dip.method": "dip", "dip.trajectories": 2,
            "dip.lr_scale": 50.0, "train.lora.r": 4}
    names = {(stage, method, ckpt): f"z{stage}-{method}-{'ckpt' if ckpt else 'plain'}"
             for stage, method in CKPT_CASES for ckpt in (False, True)}

    def build(root):
        overrides = {root / name: {**base, "train.zero_stage": key[0], "train.method": key[1],
                                   "train.gradient_checkpointing": key[2]} for key, name in names.items()}
        overrides[root / "eager"] = {**base, "train.zero_stage": 2, "model.attn_implementation": "eager"}
        train_many(overrides)

    root = built_for_the_session(tmp_path_factory, "gradckpt", build)
    return {**{key: root / name for key, name in names.items()}, "eager": root / "eager"}


@pytest.mark.parametrize("stage,method", CKPT_CASES)
def test_gradient_checkpointing_gives_the_same_training(checkpointing_runs, stage, method):
    """Recomputed blocks replay DIP's noise exactly and count the prior once: the same losses and
    the same weights (λ and LoRA adapters or every weight) as without checkpointing."""
    plain, ckpt = checkpointing_runs[(stage, method, False)], checkpointing_runs[(stage, method, True)]
    a, b = metrics(plain), metrics(ckpt)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 and abs(x["prior"] - y["prior"]) <= 1e-9, (x, y)
    wa = consolidate_zero_checkpoint(latest_checkpoint(plain / "checkpoints"))
    wb = consolidate_zero_checkpoint(latest_checkpoint(ckpt / "checkpoints"))
    assert set(wa) == set(wb) and sum("log_variance" in k for k in wa) == 4
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    assert json.loads((ckpt / "train_summary.json").read_text())["gradient_checkpointing"] is True


def test_attention_implementation_is_chosen_and_recorded(checkpointing_runs):
    eager, sdpa = checkpointing_runs["eager"], checkpointing_runs[(2, "full", False)]
    assert json.loads((eager / "train_summary.json").read_text())["attn_implementation"] == "eager"
    assert json.loads((sdpa / "train_summary.json").read_text())["attn_implementation"] == "sdpa"
    a, b = metrics(eager), metrics(sdpa)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-4  # two kernels, one attention


def test_validation_during_training_keeps_the_best_and_stops_early(tmp_path):
    """train.eval_every on a validation_fraction carved from train (2 ranks, ZeRO-3, uneven shares):
    val_nll logged at every validation, equal to the exported best checkpoint's own answer NLL
    on the validation examples (DIP on its mean path); keep_best exports the lowest; patience 2
    stops the run after two validations that did not beat the best by train.early_stopping_threshold
    (set far above any gain here, so the stop does not hang on this machine's loss curve)."""
    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.data import TokenizedExamples, collate, preprocess
    from dipnet.pipeline.models import load_causal_lm, load_tokenizer
    from dipnet.pipeline.train import next_token_logprobs

    run = tmp_path / "val"
    r = train(run, {"train.max_steps": 40, "train.save_every": 100, "train.keep_last": 1, "train.zero_stage": 3,
                    "dip.method": "dip", "data.validation_fraction": 0.1, "train.eval_every": 2, "train.keep_best": True,
                    "train.early_stopping_patience": 2, "train.early_stopping_threshold": 100.0})
    base = tiny_base(r.model.tiny, progress=False)
    meta = preprocess(r.data, base, run.parent / "_preprocessed")
    assert meta["validation_examples"] == 10 and meta["examples"] == 86  # 96 rows: 10% held out, never trained on
    summary = json.loads((run / "train_summary.json").read_text())
    v = summary["validation"]
    val = [row for row in metrics(run) if "val_nll" in row]
    assert [row["step"] for row in val] == list(range(2, summary["steps"] + 1, 2))
    best = min(val, key=lambda row: row["val_nll"])
    assert v["best_step"] == best["step"] and v["best_val_nll"] == best["val_nll"]
    assert v.get("stopped_early_at") == summary["steps"] == 6 and v["since_best"] == 2, (v, [x["val_nll"] for x in val])
    assert summary["checkpoint"].endswith(f"step-{best['step']:06d}")  # kept through keep_last 1, and exported
    export_checkpoint(run, tmp_path / "best")
    model = load_causal_lm(tmp_path / "best", with_dip=False).eval()  # the mean path is the base architecture
    pad = load_tokenizer(base).pad_token_id
    examples = TokenizedExamples(meta["validation_path"])
    with torch.no_grad():
        lp, mask = next_token_logprobs(model, collate([examples[i] for i in range(len(examples))], pad))
    assert abs(-lp.sum().item() / mask.sum().item() - best["val_nll"]) <= 1e-4


def test_loss_is_weighted_by_tokens_across_the_optimizer_step(tmp_path):
    """One optimizer step over 16 sequences split as 1 rank × 8 micro-batches, 2 × 4 and 4 × 2
    has one gradient: that of the mean NLL over every counted token of the 16 (micro-batches hold
    unequal counts, so a mean of micro-batch means differs) plus the prior once, computed here by
    hand in one forward. AdamW's first moment after one step is 0.1·gradient, read from ZeRO-0
    checkpoints (the whole optimizer state on every rank). λ starts at 1e-14: the noise is far
    below the tolerance while the prior still pulls on λ."""
    from dipnet.pipeline import dip as dipmod
    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.checkpoint import weights_only_torch_load
    from dipnet.pipeline.data import TokenizedExamples, batch_indices, collate, preprocess
    from dipnet.pipeline.model_setup import setup_model
    from dipnet.pipeline.models import load_tokenizer
    from dipnet.pipeline.train import next_token_logprobs

    over = {"train.max_steps": 1, "train.save_every": 1, "train.zero_stage": 0, "train.micro_batch_size": 2,
            "train.global_batch_size": 16, "dip.method": "dip", "dip.init_variance": 1e-14, "train.grad_clip": 0.0,
            "train.warmup_steps": 0}
    moments = {}
    for procs in (1, 2, 4):
        run = tmp_path / f"ranks{procs}"
        r = train(run, over, procs=procs)
        [shard] = latest_checkpoint(run / "checkpoints").glob("*/mp_rank_00_model_states.pt")
        with weights_only_torch_load():
            state = torch.load(shard, map_location="cpu", weights_only=True)["optimizer"]["state"]
        moments[procs] = [state[i]["exp_avg"] for i in sorted(state)]

    # By hand: the 16 sequences of step 0 in one batch, the optimizer's parameter order.
    base = tiny_base(r.model.tiny, progress=False)
    examples = TokenizedExamples(preprocess(r.data, base, tmp_path / "_preprocessed")["path"])
    pad = load_tokenizer(base).pad_token_id
    micro = batch_indices(len(examples), r.run.seed, 0, 2, 8, 0, 1)
    counts = [sum(int((examples[i]["labels"][1:] != -100).sum()) for i in idx) for idx in micro]
    assert len(set(counts)) > 1, counts
    model, _ = setup_model(r, base, trust_remote_code=False, dtype=torch.float32)
    dipmod.set_dip_mode(model, "mean")
    lp, mask = next_token_logprobs(model, collate([examples[i] for idx in micro for i in idx], pad))
    assert int(mask.sum()) == sum(counts) == metrics(tmp_path / "ranks4")[0]["counted_tokens"]
    loss = -lp.sum() / mask.sum() + dipmod.dip_prior(model, r.dip.alpha, r.dip.beta, r.dip.prior_reduction)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [p for n, p in named if "log_variance" not in n] + [p for n, p in named if "log_variance" in n]
    expected = [0.1 * g for g in torch.autograd.grad(loss, order)]
    # The mistake this test is for: the mean of the 8 micro-batch means (2 sequences each).
    lp, mask = next_token_logprobs(model, collate([examples[i] for idx in micro for i in idx], pad))
    mean_of_means = torch.stack([-lp[k:k + 2].sum() / mask[k:k + 2].sum() for k in range(0, 16, 2)]).mean()
    prior = dipmod.dip_prior(model, r.dip.alpha, r.dip.beta, r.dip.prior_reduction)
    mistaken = [0.1 * g for g in torch.autograd.grad(mean_of_means + prior, order)]
    assert sum("log_variance" in n for n, _ in named) == 4

    def worst(got, want):  # per tensor, relative to its largest entry: float32 sums in another order
        return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))  # (up to 8e-5)

    for procs in (1, 2, 4):
        assert len(moments[procs]) == len(expected)
        assert worst(moments[procs], expected) <= 1e-3 < 1e-2 < worst(moments[procs], mistaken), (
            procs, worst(moments[procs], expected), worst(moments[procs], mistaken))


def test_ranks_wait_for_the_universal_conversion_on_the_file_system(tmp_path):
    """Rank 0 converts; the others wait for its marker with a budget sized to the checkpoint
    (10 min + 1 min per GiB), not in a collective that times out after 30 min; a failure of rank 0
    reaches them as one line."""
    import threading

    from dipnet.pipeline.checkpoint import conversion_budget_s, wait_for_conversion

    ckpt = tmp_path / "step-000010"
    (ckpt / "universal").mkdir(parents=True)
    (ckpt / "shard.pt").write_bytes(b"x" * (2**20))
    assert 600 < conversion_budget_s(ckpt) < 601
    done, failed = ckpt / "universal" / ".complete", ckpt / "universal.failed"
    threading.Timer(0.3, lambda: done.write_text("ok")).start()
    wait_for_conversion(done, failed, budget_s=10, poll_s=0.05)
    done.unlink()
    failed.write_text("cannot convert ... (KeyError: 'param_shapes')")
    with pytest.raises(RunError, match=r"rank 0 failed: cannot convert .*param_shapes"):
        wait_for_conversion(done, failed, budget_s=10, poll_s=0.05)
    failed.unlink()
    with pytest.raises(RunError, match="universal conversion did not finish in 0 s"):
        wait_for_conversion(done, failed, budget_s=0.1, poll_s=0.05)
