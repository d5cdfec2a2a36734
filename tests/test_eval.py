"""GSM8K scoring against lm-evaluation-harness rules, tasks and perturbations, both engines,
average:k, results files, re-scoring, and the OpenAI-compatible server."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import SHARED_GSM8K, cli_in_process

from dipnet.eval import extract
from dipnet.eval.metrics import paired_bootstrap, wilson_interval
from dipnet.eval.tasks import build_task

# (output, target, strict extracted, strict correct, flexible extracted, flexible correct)
CASES = [
    ("She has 5 + 3 = 8 apples.\n#### 8", "#### 8", "8", True, "8", True),
    ("#### 1,234", "Janet makes 1234\n#### 1234", "1,234", True, "1,234", True),
    ("The total is $18.", "#### 18", "[invalid]", False, "$18.", True),
    ("#### 18.", "#### 18", "18.", True, "18.", True),
    ("First 3, then 4, answer 7", "#### 7", "[invalid]", False, "7", True),
    ("#### 5\nQuestion: next #### 9", "#### 5", "5", True, "9", False),
    ("#### -3", "#### -3", "-3", True, "-3", True),
    ("The answer is 2.5 hours", "#### 2.5", "[invalid]", False, "2.5", True),
    ("no numbers here", "#### 4", "[invalid]", False, "[invalid]", False),
    ("#### 10\n\nSo 10 dollars, i.e. 1,000 cents", "#### 10", "10", True, "1,000", False),
    ("x = 12, y = 1", "#### 12", "[invalid]", False, "1", False),
    ("####12", "#### 12", "[invalid]", False, "12", True),  # strict needs the space; flexible does not
    ("It costs $1,000.00 in total.", "#### 1000.00", "[invalid]", False, "$1,000.00", True),
]


@pytest.mark.parametrize("out,target,se,sc,fe,fc", CASES)
def test_extraction_matches_lm_eval_rules(out, target, se, sc, fe, fc):
    s = extract.score_output(out, target)
    assert s["strict-match"] == {"extracted": se, "correct": sc}
    assert s["flexible-extract"] == {"extracted": fe, "correct": fc}


def test_normalize_and_stop():
    assert extract.normalize("Janet sells 3\n#### $1,234.") == "1234"
    assert extract.truncate_at_stop("7\n#### 7\n\nQuestion: more", ["Question:"]) == "7\n#### 7\n\n"


def test_wilson_and_bootstrap():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    a = [[1.0] * 50 + [0.0] * 50] * 3
    d, lo, hi = paired_bootstrap(a, a)
    assert d == 0 and lo == 0 and hi == 0
    d, lo, hi = paired_bootstrap([[1.0] * 100], [[0.0] * 100])
    assert d == 1 and lo == 1


@pytest.mark.skipif(not (SHARED_GSM8K / "test.jsonl").is_file(), reason="../shared/data/gsm8k not present")
def test_gsm8k_gold_answers_score_100(tmp_path):
    from dipnet.eval.evaluate import rescore_predictions

    rows = [json.loads(l) for l in (SHARED_GSM8K / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    pred = tmp_path / "gold.jsonl"
    pred.write_text("".join(json.dumps({"output": r["answer"], "target": r["answer"]}) + "\n" for r in rows))
    res = rescore_predictions(pred, "gsm8k", tmp_path / "out")
    s = res["tasks"]["gsm8k"]["scores"]
    assert s["strict-match"]["accuracy"] == 1.0 and s["flexible-extract"]["accuracy"] == 1.0
    assert s["strict-match"]["n"] == 1319


@pytest.mark.skipif(not (SHARED_GSM8K / "test.jsonl").is_file(), reason="../shared/data/gsm8k not present")
def test_gsm8k_prompt_is_lm_eval_format():
    t = build_task("gsm8k", shots=5, gsm8k_path=str(SHARED_GSM8K))
    p = t.prompt(0)
    assert p.count("Question: ") == 6 and p.endswith(f"Question: {t.problems[0]['question']}\nAnswer:")
    assert "\n\nQuestion: " in p and p.split("\n\n")[0].split("\nAnswer: ")[1].rstrip().split("#### ")[-1].strip().replace(",", "").isdigit()
    assert t.stops[0] == "Question:" and len(t.problems) == 1319
    assert build_task("gsm8k", shots=5, gsm8k_path=str(SHARED_GSM8K)).shot_sets == t.shot_sets  # deterministic
    assert t.shot_sets[0] != t.shot_sets[1]  # drawn afresh for every question, as lm-eval does
    # The first N problems get the same shots whatever N is (lm-eval's --limit).
    assert build_task("gsm8k", shots=5, limit=7, gsm8k_path=str(SHARED_GSM8K)).shot_sets == t.shot_sets[:7]
    tp = build_task("gsm8k-perturbed", gsm8k_path=str(SHARED_GSM8K), limit=10)
    assert all(a["answer"] == b["answer"] for a, b in zip(tp.problems, t.problems[:10]))
    assert all(a["question"] != b["question"] for a, b in zip(tp.problems, t.problems[:10]))


def test_arith_perturbed_keeps_answers():
    base, pert = build_task("arith-id"), build_task("arith-perturbed")
    assert len(base.problems) == len(pert.problems)
    assert all(a["answer"] == b["answer"] and a["question"] != b["question"] for a, b in zip(base.problems, pert.problems))
    assert build_task("arith-perturbed").problems == pert.problems  # deterministic


def test_unknown_task_cli(tmp_path):
    res = cli_in_process("eval", "some_dir", "--tasks", "arith-idd", "--out", tmp_path / "o")
    assert res.returncode == 2 and "unknown task 'arith-idd' (did you mean 'arith-id'?)" in res.stderr


@pytest.fixture(scope="module")
def vllm_fp32(exported, tmp_path_factory):
    """One float32 vLLM engine on `exported`, shared by this module's tests (as a study shares one
    engine per model): each engine start costs an import, a load and a KV-cache allocation."""
    from dipnet.eval.evaluate import max_model_len
    from dipnet.eval.vllm_runner import VllmEngine

    cfg = json.loads((exported / "config.json").read_text())
    engine = VllmEngine(exported, tmp_path_factory.mktemp("vllm_fp32"), max_model_len(cfg), dtype="float32")
    yield engine
    engine.close()


def test_cpu_engine_scores_without_compiling(vllm_fp32):
    """vLLM ranks prompt logprobs with a torch.compile'd function: 7.5 s of tracing per process
    even from a warm kernel cache. On a CPU the engine runs in this process and scores eagerly
    (the rank is an integer count, identical either way). torch._dynamo.reset() forgets any
    earlier compile in this process, so a compile here would show in dynamo's counters."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = sum(counters["frames"].values())
    seqs = [[1, 5, 9, 13, 2, 7], [1, 4, 4, 8]]
    lps = vllm_fp32.prompt_logprobs(seqs)
    assert sum(counters["frames"].values()) == before, dict(counters["frames"])
    assert [len(x) for x in lps] == [5, 3] and all(lp <= 0 and rank >= 1 for x in lps for lp, rank in x)


@pytest.mark.slow
def test_vllm_and_hf_agree_and_results_complete(exported, vllm_fp32, tmp_path):
    from dipnet.eval.evaluate import evaluate_model

    from dipnet.eval.vllm_runner import USER_KV_CACHE_GIB

    # The engine was given the KV cache the tiny model can use (1 GiB), not the 4 GiB default.
    assert USER_KV_CACHE_GIB is not None or os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    tasks = ["arith-id", "arith-ood", "arith-perturbed"]
    rv = evaluate_model(exported, tasks, tmp_path / "v", engine="vllm", vllm_engine=vllm_fp32, limit=48,
                        max_new_tokens=40, progress=False)
    rh = evaluate_model(exported, tasks, tmp_path / "h", engine="hf", limit=48, max_new_tokens=40, progress=False)
    for t in tasks:
        sv = [json.loads(l) for l in (tmp_path / "v" / f"samples_{t}.jsonl").read_text().splitlines()]
        sh = [json.loads(l) for l in (tmp_path / "h" / f"samples_{t}.jsonl").read_text().splitlines()]
        assert [s["output"] for s in sv] == [s["output"] for s in sh], t
        assert rv["tasks"][t]["scores"] == rh["tasks"][t]["scores"]
        for s in sv:
            assert set(s) >= {"prompt", "output", "target", "extracted", "correct", "answer_nll"}
        r = rv["tasks"][t]
        assert set(r) >= {"n", "setup", "scores", "teacher_forced", "wall_s", "generated_tokens_per_s"}
        for sc in ("strict-match", "flexible-extract"):
            assert set(r["scores"][sc]) == {"accuracy", "correct", "n", "ci95"}
        assert r["setup"]["stop"][0] == "Question:" and r["setup"]["shots"] == 0
        # NLL from vLLM's prompt logprobs equals the transformers forward pass.
        assert abs(r["teacher_forced"]["answer_nll"] - rh["tasks"][t]["teacher_forced"]["answer_nll"]) <= 1e-3
        assert r["teacher_forced"]["engine"] == "vllm" and rh["tasks"][t]["teacher_forced"]["engine"] == "hf"
        per_v = [s["answer_nll"] for s in sv]
        per_h = [s["answer_nll"] for s in sh]
        assert max(abs(a - b) for a, b in zip(per_v, per_h)) <= 1e-3
    assert rv["engine"] == "vllm" and rv["engine_version"].startswith("vllm") and len(rv["model_fingerprint"]) == 16
    # It learned the format: the untrained-on-problems base sits at an answer NLL of ~5.6.
    assert rv["tasks"]["arith-id"]["teacher_forced"]["answer_nll"] < 1.5


def test_vllm_sampling_is_seeded_and_runs_lm_eval_self_consistency(exported, vllm_fp32, tmp_path):
    """n-sampling on the vLLM engine: the same seed, the same samples; another seed, others. And
    lm-eval's gsm8k_cot_self_consistency (64 sampled chains per problem, its maj@64/maj@8 filters)
    runs on the same engine from the local GSM8K copy, one n=64 request per problem."""
    from dipnet.eval.evaluate import evaluate_model
    from dipnet.eval.sampling import Sampling

    outs = {}
    for seed, name in [(0, "a"), (0, "b"), (1, "c")]:
        evaluate_model(exported, ["arith-id"], tmp_path / name, engine="vllm", vllm_engine=vllm_fp32, limit=6,
                       answer_nll=False, progress=False, sampling=Sampling(n=4, temperature=0.9, seed=seed, k=(1, 4)))
        outs[name] = [json.loads(line)["outputs"] for line in (tmp_path / name / "samples_arith-id.jsonl").open()]
    assert outs["a"] == outs["b"] != outs["c"] and all(len(o) == 4 for o in outs["a"])
    if not (SHARED_GSM8K / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K data at {SHARED_GSM8K}")
    r = evaluate_model(exported, [], tmp_path / "sc", engine="vllm", vllm_engine=vllm_fp32, limit=2,
                       harness_tasks=["gsm8k_cot_self_consistency"], gsm8k_path=str(SHARED_GSM8K), progress=False)
    assert {"exact_match,score-first", "exact_match,maj@64", "exact_match,maj@8"} <= set(
        r["harness"]["gsm8k_cot_self_consistency"])
    files = list((tmp_path / "sc" / "harness").rglob("samples_gsm8k_cot_self_consistency_*.jsonl"))
    rows = [row for line in files[0].open() if (row := json.loads(line))["filter"] == "maj@64"]  # a row per filter
    assert len(rows) == 2 and all(len(row["resps"][0]) == 64 for row in rows)
    assert all(len(set(row["resps"][0])) > 1 for row in rows)  # sampled, not one greedy chain 64 times


@pytest.mark.slow
def test_bfloat16_eval_runs_in_bfloat16_on_both_engines(exported, vllm_fp32, tmp_path):
    """eval.dtype bfloat16 reaches both engines: answer NLLs move by bfloat16 rounding (not 0,
    not more than a few percent) from float32, and results.json records the dtype."""
    from dipnet.eval.evaluate import evaluate_model

    kw = dict(limit=16, max_new_tokens=16, progress=False)
    nll = {}
    for engine in ("vllm", "hf"):
        for dtype in ("float32", "bfloat16"):
            shared = vllm_fp32 if (engine, dtype) == ("vllm", "float32") else None
            r = evaluate_model(exported, ["arith-id"], tmp_path / f"{engine}-{dtype}", engine=engine, dtype=dtype,
                               vllm_engine=shared, **kw)
            assert r["dtype"] == dtype
            nll[engine, dtype] = r["tasks"]["arith-id"]["teacher_forced"]["answer_nll"]
    # The bfloat16 engine was this evaluation's own: closed, it left nothing in /tmp or its directory.
    assert (tmp_path / "vllm-bfloat16" / "vllm" / "engine.log").is_file()
    assert not list((tmp_path / "vllm-bfloat16").glob("vllm/tmp/*.sock"))
    for engine in ("vllm", "hf"):
        a, b = nll[engine, "float32"], nll[engine, "bfloat16"]
        assert a != b and abs(a - b) <= 0.05 * a, (engine, a, b)
    assert abs(nll["vllm", "float32"] - nll["hf", "float32"]) <= 1e-3


def test_eval_dtype_auto_follows_the_training_precision(exported, tmp_path, monkeypatch):
    """eval.dtype auto reads the precision dipnet trained the model in from its export.json; bf16
    only where the machine runs it natively; anything else in that file is not believed."""
    from dipnet.eval import vllm_runner
    from dipnet.pipeline import env

    assert json.loads((exported / "export.json").read_text())["train_precision"] == "fp32"
    assert vllm_runner.resolve_dtype("auto", "vllm", exported) == "float32"
    monkeypatch.setattr(vllm_runner, "_has_cuda", lambda: True)
    assert vllm_runner.resolve_dtype("auto", "vllm", exported) == "float32"  # trained in fp32: evaluated so
    assert vllm_runner.resolve_dtype("auto", "vllm", tmp_path) == "bfloat16"  # not ours: vLLM's GPU default
    (tmp_path / "export.json").write_text(json.dumps({"train_precision": "bf16"}))
    assert vllm_runner.resolve_dtype("auto", "hf", tmp_path) == "bfloat16"
    monkeypatch.setattr(vllm_runner, "_has_cuda", lambda: False)
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(env, "cpu_has_native_bf16", lambda: native)
        assert vllm_runner.resolve_dtype("auto", "vllm", tmp_path) == want
    assert vllm_runner.resolve_dtype("float32", "vllm", tmp_path) == "float32"  # an explicit choice wins
    for hostile in ('{"train_precision": "../../x"}', "[1, 2]", "not json", '{"train_precision": 16}'):
        (tmp_path / "export.json").write_text(hostile)
        assert vllm_runner.resolve_dtype("auto", "hf", tmp_path) == "float32"


@pytest.mark.slow
def test_average_k1_without_noise_equals_mean(exported):
    from dipnet.eval.hf_runner import greedy_generate, load_hf
    from dipnet.pipeline import dip

    model, tok = load_hf(exported, dip_mode="mean")
    task = build_task("arith-id", limit=16)
    prompts = [tok(task.prompt(i)).input_ids for i in range(len(task.problems))]
    mean = greedy_generate(model, tok, prompts, 32, task.stops, k=1)
    dip.set_dip_mode(model, "mean")  # no noise
    avg = greedy_generate(model, tok, prompts, 32, task.stops, k=1)
    avg3 = greedy_generate(model, tok, prompts, 32, task.stops, k=3)  # k copies of a noiseless path
    assert mean == avg == avg3
    dip.set_dip_mode(model, "sample")
    noisy = greedy_generate(model, tok, prompts, 32, task.stops, k=4)
    assert len(noisy) == len(mean)


@pytest.mark.slow
def test_hf_noise_sweep_and_average_mode(exported, tmp_path):
    from dipnet.eval.evaluate import evaluate_model

    r = evaluate_model(exported, ["arith-id"], tmp_path / "n", engine="hf", limit=24, max_new_tokens=32,
                       dip_mode="average:2", noise_sigmas=[0.0, 1.0], progress=False)
    sweep = r["noise_sweep"]["arith-id"]
    assert set(sweep) == {"0.0", "1.0"} and all(0 <= v <= 1 for v in sweep.values())
    assert r["dip_mode"] == "average:2"
    # The noise really reaches the embeddings: σ = 0 is the clean path, σ = 1 changes the text.
    from dipnet.eval.hf_runner import embedding_noise, greedy_generate, load_hf

    model, tok = load_hf(exported)
    task = build_task("arith-id", limit=8)
    prompts = [tok(task.prompt(i)).input_ids for i in range(len(task.problems))]
    clean = greedy_generate(model, tok, prompts, 24, task.stops)
    with embedding_noise(model, 0.0, seed=0):
        assert greedy_generate(model, tok, prompts, 24, task.stops) == clean
    with embedding_noise(model, 1.0, seed=0):
        assert greedy_generate(model, tok, prompts, 24, task.stops) != clean


@pytest.mark.slow
def test_cli_eval_and_rescore(exported, tmp_path):
    res = cli_in_process("eval", exported, "--tasks", "arith-id", "--engine", "hf", "--limit", "8", "--max-new-tokens", "32",
                  "--out", tmp_path / "e")
    assert res.returncode == 0, res.stderr[-1500:]
    res2 = cli_in_process("eval", "--predictions", tmp_path / "e" / "samples_arith-id.jsonl", "--task", "arith-id",
                   "--out", tmp_path / "r")
    assert res2.returncode == 0, res2.stderr
    a = json.loads((tmp_path / "e" / "results.json").read_text())["tasks"]["arith-id"]["scores"]
    b = json.loads((tmp_path / "r" / "results.json").read_text())["tasks"]["arith-id"]["scores"]
    assert a == b


def test_vllm_engine_that_fails_to_start(tmp_path):
    from dipnet.eval.vllm_runner import VllmEngine
    from dipnet.pipeline.errors import RunError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(RunError, match="vLLM engine failed to start for"):
        VllmEngine(tmp_path, tmp_path / "w", 128)


@pytest.mark.slow
def test_serve_answers_one_completion(exported, tmp_path):
    from dipnet.launch.local import free_port

    port = free_port()
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "w"  # vLLM's sockets cannot live this deep
    proc = subprocess.Popen([sys.executable, "-m", "dipnet.pipeline.cli", "serve", str(exported), "--port", str(port),
                             "--workdir", str(deep)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    models = json.load(r)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "server did not come up"
                time.sleep(1)
        name = models["data"][0]["id"]
        body = json.dumps({"model": name, "prompt": "Question: Ann has 3 pens. She buys 4 more. How many pens does Ann have now?\nAnswer:",
                           "max_tokens": 24, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.load(r)
        assert out["choices"][0]["text"].strip()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    from dipnet.eval.vllm_runner import SYSTEM_TMP

    sockets = Path(SYSTEM_TMP) / f"dipnet-sockets-{os.getuid()}" / hashlib.sha256(str(deep.resolve()).encode()).hexdigest()[:16]
    assert not sockets.exists(), list(sockets.iterdir())  # the stopped server's sockets were removed


@pytest.mark.slow
def test_smoothness_cli_task_and_data(exported, tmp_path):
    res = cli_in_process("smoothness", exported, "--task", "arith-id", "--limit", "8", "--out", tmp_path / "s.json")
    assert res.returncode == 0, res.stderr[-1500:]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["n"] == 8 and s["grad_norm"] > 0 and s["adversarial_increase"] >= s["random_increase"] - 1e-6
    assert s["hessian_trace"] == s["hessian_trace"]  # a number
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "Ann has 2 pens. How many pens does Ann have now?", "answer": "#### 2"}) + "\n")
    res = cli_in_process("smoothness", exported, "--data", data)
    assert res.returncode == 0 and json.loads(res.stdout)["n"] == 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3_text", "phi3"])
def test_gqa_attention_equals_transformers_sdpa(family):
    """The hf engine's SDPA with grouped KV heads gives transformers' SDPA's logits and greedy tokens
    on left-padded batches (prefill and cached decode), and is used only where KV heads are shared."""
    import torch
    from conftest import family_configs
    from transformers import AutoModelForCausalLM

    from dipnet.eval.hf_runner import GQA_SDPA, greedy_generate, use_gqa_sdpa

    torch.manual_seed(0)
    cfg = family_configs()[family]
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    switched = use_gqa_sdpa(model)
    assert switched == (cfg.num_key_value_heads < cfg.num_attention_heads), family
    if not switched:
        return

    class Tok:  # the two ids greedy_generate needs, and a decode it can call
        eos_token_id, pad_token_id = 2, 0

        def decode(self, ids, **_):
            return " ".join(map(str, ids))

    prompts = [[1, 5, 9, 14, 3, 7, 8], [1, 30, 4], [1, 11, 12, 13, 60]]
    ids = torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    mask = (torch.arange(7) >= torch.tensor([7 - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        gen_ours = greedy_generate(model, Tok(), prompts, 6, stops=[])
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids, attention_mask=mask).logits
        gen_theirs = greedy_generate(model, Tok(), prompts, 6, stops=[])
    assert model.config._attn_implementation == "sdpa" and GQA_SDPA != "sdpa"
    keep = mask.bool()
    assert (ours - theirs)[keep].abs().max().item() <= 1e-5
    assert gen_ours == gen_theirs


def test_cpu_kv_cache_is_what_the_model_can_use(monkeypatch):
    """The CPU engine's KV cache (touched page by page at start-up, ~2 s per GiB) is capped by what
    256 sequences at full length can fill: 1 GiB for the tiny base, 4 for SmolLM2; a config that
    does not say keeps the default, a hostile one too."""
    from dipnet.eval import vllm_runner

    tiny = {"num_hidden_layers": 4, "num_attention_heads": 4, "hidden_size": 128}
    assert vllm_runner.kv_cache_bytes(tiny, 256 * 256, "float32") == 2 * 4 * 4 * 32 * 4 * 256 * 256  # 256 MiB
    assert vllm_runner.kv_cache_bytes(tiny, 256 * 256, "bfloat16") == 2 * 4 * 4 * 32 * 2 * 256 * 256
    smol = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    gemma3 = {"text_config": {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}}
    assert vllm_runner.kv_cache_bytes(gemma3, 100, "float32") == 2 * 2 * 1 * 32 * 4 * 100
    monkeypatch.setattr("builtins.open", lambda *a, **k: __import__("io").StringIO("MemAvailable: 100000000 kB\n"))
    assert vllm_runner.default_kv_cache_gib(vllm_runner.kv_cache_bytes(tiny, 256 * 256, "float32")) == 1
    assert vllm_runner.default_kv_cache_gib(vllm_runner.kv_cache_bytes(smol, 256 * 4096, "float32")) == 4
    assert vllm_runner.default_kv_cache_gib(3 * 2**30 + 1) == 4 and vllm_runner.default_kv_cache_gib(None) == 4
    for hostile in ([1], {"text_config": "x"}, {}, {"num_hidden_layers": "many"}, {"num_hidden_layers": 2,
                                                                                    "num_attention_heads": 0}):
        assert vllm_runner.kv_cache_bytes(hostile, 256, "float32") is None


def test_engine_sockets_fit_a_unix_socket_address(tmp_path):
    """vLLM binds `ipc://<VLLM_RPC_BASE_PATH>/<uuid>`; a Unix socket's path holds 107 bytes. A short
    workdir keeps them inside; a deep one gets a private directory of this user's, one per workdir."""
    from dipnet.eval.vllm_runner import SOCKET_PATH_MAX, release_socket_dir, vllm_environment

    short = Path("/tmp") / f"w{os.getpid()}"
    try:
        assert vllm_environment(short)["VLLM_RPC_BASE_PATH"] == str(short / "tmp")
    finally:
        shutil.rmtree(short, ignore_errors=True)
    deep = tmp_path / ("d" * 60) / "w"
    a = Path(vllm_environment(deep)["VLLM_RPC_BASE_PATH"])
    b = Path(vllm_environment(deep / "x")["VLLM_RPC_BASE_PATH"])
    try:
        assert len(f"{a}/{uuid.uuid4()}") <= SOCKET_PATH_MAX and a.is_dir() and a.stat().st_mode & 0o777 == 0o700
        assert a == Path(vllm_environment(deep)["VLLM_RPC_BASE_PATH"]) != b
        assert vllm_environment(deep)["TMPDIR"] == str(deep.resolve() / "tmp")  # the rest stays in the workdir
    finally:
        release_socket_dir(a), release_socket_dir(b)
    assert not a.exists() and not b.exists()


def test_a_socket_dir_another_user_could_reach_is_refused(tmp_path, monkeypatch):
    """The private socket directory sits in a shared /tmp: one that is not ours alone (made by
    someone else, or opened up) is refused in one line, never used."""
    from dipnet.eval import vllm_runner
    from dipnet.pipeline.errors import RunError

    import tempfile

    short = Path(tempfile.mkdtemp(prefix="dn", dir="/tmp"))  # a system temp dir short enough to be used
    try:
        monkeypatch.setattr(vllm_runner, "SYSTEM_TMP", str(short))
        base = short / f"dipnet-sockets-{os.getuid()}"
        base.mkdir()
        base.chmod(0o755)
        with pytest.raises(RunError, match="not a private directory of this user"):
            vllm_runner.vllm_environment(tmp_path / ("d" * 90) / "w")
        assert list(base.iterdir()) == []
    finally:
        shutil.rmtree(short)


def test_context_is_the_models_own_bounded_by_the_recipe():
    """The engine serves the context the model was built for (no fixed 4,096 cap), bounded by
    eval.max_model_len; hostile config values fall back to 2,048."""
    from dipnet.eval.evaluate import max_model_len
    from dipnet.pipeline.recipe import Recipe, apply_overrides

    assert max_model_len({"max_position_embeddings": 8192}) == 8192
    assert max_model_len({"text_config": {"max_position_embeddings": 131072}}) == 131072
    assert max_model_len({"max_position_embeddings": 131072}, 16384) == 16384
    assert max_model_len({"max_position_embeddings": "long"}) == max_model_len({"n_positions": -1}) == 2048
    r = Recipe.model_validate(apply_overrides({}, {"eval.max_model_len": 16384, "eval.gpu_memory_utilization": 0.8}))
    assert r.eval.max_model_len == 16384 and r.eval.tensor_parallel_size is None
    with pytest.raises(Exception, match="gpu_memory_utilization"):
        Recipe.model_validate(apply_overrides({}, {"eval.gpu_memory_utilization": 1.5}))


def test_a_prompt_longer_than_the_context_is_reported_per_problem(tmp_path, tiny_base_dir):
    """The first 8 GSM8K test questions take 60 to 278 tokens on the embedded model (context 256):
    the ones that fit run, the one that does not is scored wrong, never cut, and named in its
    sample row, in results.json and in one note."""
    if not (SHARED_GSM8K / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K data at {SHARED_GSM8K}")
    res = cli_in_process("eval", tiny_base_dir, "--tasks", "gsm8k", "--engine", "hf", "--limit", "8",
                         "--max-new-tokens", "8", "--gsm8k-path", SHARED_GSM8K, "--out", tmp_path / "e")
    assert res.returncode == 0, res.stderr[-1500:]
    task = json.loads((tmp_path / "e" / "results.json").read_text())["tasks"]["gsm8k"]
    rows = [json.loads(line) for line in (tmp_path / "e" / "samples_gsm8k.jsonl").read_text().splitlines()]
    over = [i for i, r in enumerate(rows) if "over_long" in r]
    assert 0 < len(over) < 8 and task["over_long"] == over and task["n"] == 8
    for i, r in enumerate(rows):
        if i in over:
            assert r["over_long"]["prompt_tokens"] >= 256 == r["over_long"]["context"]
            assert r["output"] == "" and not any(r["correct"].values()) and "answer_nll" not in r
        else:  # it ran; its output may be empty (the tiny model may stop at once, at its EOS or "Question:")
            assert "answer_nll" in r and isinstance(r["output"], str)
    assert any(rows[i]["output"] for i in range(8) if i not in over)
    assert task["teacher_forced"]["n"] == 8 - len(over) and task["scores"]["flexible-extract"]["n"] == 8
    notes = [line for line in res.stderr.splitlines() if "note:" in line]
    assert notes == [f"  note: task gsm8k: {len(over)} of 8 prompts have 256 tokens or more (the model's context); "
                     "they are scored wrong, not cut (over_long in results.json)"]


def test_plain_eval_works_on_the_embedded_model(tmp_path, tiny_base_dir):
    """Each task brings its own budget (gsm8k: lm-eval's 256; arithmetic: 48), and a default that
    the model's context cannot hold is capped with one note, not refused (an explicit one is:
    test_hostile.EVAL_FLAGS)."""
    if not (SHARED_GSM8K / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K data at {SHARED_GSM8K}")
    res = cli_in_process("eval", tiny_base_dir, "--tasks", "arith-id,gsm8k", "--engine", "hf", "--limit", "2",
                         "--gsm8k-path", SHARED_GSM8K, "--no-answer-nll", "--out", tmp_path / "e")
    assert res.returncode == 0, res.stderr[-1500:]
    tasks = json.loads((tmp_path / "e" / "results.json").read_text())["tasks"]
    assert tasks["arith-id"]["max_new_tokens"] == 48
    cap = tasks["gsm8k"]["max_new_tokens"]
    assert 0 < cap < 256
    notes = [line for line in res.stderr.splitlines() if "note:" in line]
    assert notes == [f"  note: task gsm8k: max_new_tokens 256 capped at {cap} by the model's context of 256 tokens "
                     f"(longest prompt {256 - cap})"]
