"""Recipes: one YAML file, validated against typed settings before any work starts.

A recipe has one section per concern (`run`, `model`, `dip`, `data`, `train`, `launch`,
`export`, `eval`, `report`, `study`) plus `variants` and `seeds` for studies. Each section is a
frozen pydantic model with a default for every field, so a recipe only states what it changes.
`recipes/README.md` documents every key.

    recipe = load_recipe("recipes/tiny-arith.yaml", ["train.lr=1e-4", "dip.alpha=0.1"])

Every problem (unknown key, wrong type, impossible combination, missing file) raises
`UsageError` with one line naming the file and the dotted key, and suggests the closest valid
key for a misspelling.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.outputs import NAME_RE, NAME_RULE

MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000  # after YAML aliases are expanded: a 1 KB file could otherwise mean GBs
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Seeds are combined with step and rank into torch's 64-bit seed (seed x 1,000,003 + ...): 32 bits
# leave room, as numpy's legacy seeds do.
MAX_SEED = 2**32 - 1


class _Section(BaseModel):
    # allow_inf_nan=False: `inf`/`nan` are not valid for any number in a recipe.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _safe_name(v: str) -> str:
    # Names become directories and Slurm job names: no paths, no shell, no surprises.
    if not NAME_RE.fullmatch(v):
        raise ValueError(f"expected a plain name ({NAME_RULE})")
    return v


class RunSettings(_Section):
    name: str = Field("run", description="Run name; the run directory defaults to runs/<name>.")
    output_dir: Optional[str] = Field(None, description="Run directory (default runs/<name>).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for the base model, data order and noise.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _safe_name(v)

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v):
        if v is not None and (not v.strip() or CONTROL.search(v)):
            raise ValueError("expected a directory path without control characters")
        return v


class TinyBaseSettings(_Section):
    """The embedded default base: a small Llama pretrained here on synthetic arithmetic text."""

    vocab_size: int = Field(512, gt=32, description="Sentencepiece vocabulary size.")
    hidden_size: int = Field(128, gt=0, description="Model width.")
    num_layers: int = Field(4, gt=0, description="Decoder blocks.")
    num_heads: int = Field(4, gt=0, description="Attention heads (head dim = hidden/heads; vLLM CPU needs 32, 64, 80, ...).")
    intermediate_size: int = Field(384, gt=0, description="MLP width.")
    max_position: int = Field(256, gt=0, description="Longest sequence the base is built for.")
    pretrain_steps: int = Field(560, gt=0, description="Pretraining optimizer steps.")
    pretrain_batch: int = Field(24, gt=0, description="Sequences per pretraining step.")
    pretrain_lr: float = Field(3e-3, gt=0, description="Peak pretraining learning rate.")


class ModelSettings(_Section):
    base: str = Field("tiny", description="'tiny' (built here), a named pretrained source (smollm2-135m-instruct, "
                                          "gemma3-270m), a .gguf file, a Hugging Face model directory, or a hub id.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype of an imported GGUF model.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory (off unless you trust it).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel for training: auto (transformers' choice, SDPA where the model has "
                            "it), sdpa, eager, or flash_attention_2 (CUDA GPUs with the flash-attn package).")
    tiny: TinyBaseSettings = TinyBaseSettings()

    @field_validator("base")
    @classmethod
    def _base(cls, v):
        if CONTROL.search(v):  # no model name or path has one; a job script would read it as a new line
            raise ValueError("the name has a newline or control character")
        return v


DipMethod = Literal["none", "input_noise", "neftune", "dip_fixed", "dip", "dip_matched", "dip_shuffled"]
CONTROL_METHODS = ("dip_matched", "dip_shuffled")  # = dip.CONTROLS (this module does not import torch)


class DipSettings(_Section):
    method: DipMethod = Field("dip", description="none (plain fine-tuning) | input_noise | neftune | dip_fixed | dip | "
                                                 "dip_matched | dip_shuffled (controls at a dip run's noise: dip.source).")
    source: Optional[str] = Field(None, description="dip_matched/dip_shuffled: the dip run whose final λ they replay: a variant "
                                                    "of this recipe (same seed), or a model directory holding dip/.")
    trajectories: int = Field(1, ge=1, description="m: noisy trajectories per example, run as one batch.")
    antithetic: bool = Field(False, description="With an even m: the second half of the trajectories gets −ε where the first "
                                                "got ε, which cancels most of the noise in λ's gradient (recipes/README.md).")
    alpha: float = Field(1e-2, ge=0, description="Weight of Σλ in the loss (keeps variances from growing).")
    beta: float = Field(1e-4, ge=0, description="Weight of −Σ ln λ (keeps variances from collapsing); prior minimum at λ = β/α.")
    prior_reduction: Literal["sum", "mean"] = Field(
        "sum", description="sum: Σ over all N variances (the ELBO's form; each λ's pull independent of model size); "
                           "mean: divided by N (pre-0.3 behaviour: α, β fade as 1/N).")
    prior_strength: Optional[float] = Field(
        None, gt=0, description="κ, in nats: with prior_variance, the prior is κ·mean over features of "
                                "(λ/λp − ln(λ/λp) − 1) and replaces alpha/beta/prior_reduction. Each λ settles at "
                                "λp / (1 + ΔNLL(λp)·c/κ), c its feature's share of the curvature (recipes/README.md).")
    prior_variance: Optional[float] = Field(None, gt=0, description="λp: the variance the prior centres λ on (with prior_strength).")
    gamma: float = Field(0.0, ge=0, description="Weight of the variance across trajectories of the target log-probability (needs m ≥ 2).")
    init_variance: float = Field(3e-3, gt=0, description="Initial λ for every feature (chosen by recipes/sweep-lambda.yaml).")
    scale: Literal["absolute", "relative"] = Field("relative", description="relative: noise × per-token RMS of the input; absolute: λ in hidden-state units.")
    rms_clip: Optional[float] = Field(None, gt=0, description="relative scale: cap each token's RMS at this multiple of its "
                                                              "sequence's median token RMS (attention-sink tokens carry "
                                                              "40-190x the others' RMS in SmolLM2: bench/sink_tokens.py).")
    placement: Literal["block_input", "attn_mlp"] = Field(
        "block_input", description="block_input: every decoder block's input; attn_mlp: the input of the attention "
                                   "and MLP norms (noise reaches those branches only; the residual path stays clean).")
    layers: Optional[list[int]] = Field(None, description="Restrict to these block indices (default: all).")
    lr_scale: float = Field(10.0, gt=0, description="Learning-rate multiplier for the λ parameters.")
    noise_scale: Optional[float] = Field(None, ge=0, description="σ for input_noise (relative to embedding RMS, default "
                                         "0.1); NEFTune's α for neftune (default 5, the NEFTune paper's).")

    @model_validator(mode="after")
    def _check(self):
        if self.gamma > 0 and self.trajectories < 2:
            raise ValueError("dip.gamma > 0 needs dip.trajectories >= 2 (a variance across one trajectory is zero)")
        if self.antithetic and self.trajectories % 2:
            raise ValueError(f"dip.antithetic pairs trajectories: dip.trajectories must be even, got {self.trajectories}")
        if (self.method in CONTROL_METHODS) != (self.source is not None):
            raise ValueError("dip.source names the dip run a control replays: set it for dip_matched/dip_shuffled only"
                             f" (method {self.method}, source {self.source!r})")
        if (self.prior_strength is None) != (self.prior_variance is None):
            raise ValueError("dip.prior_strength and dip.prior_variance go together (κ in nats, λp the prior's centre)")
        # A recipe round-trips through to_dict (variants, matching) with every field set, so the test
        # is "changed from its default", not "present".
        both = sorted(k for k in ("alpha", "beta", "prior_reduction") if getattr(self, k) != type(self).model_fields[k].default)
        if self.prior_strength is not None and both:
            raise ValueError(f"dip.{both[0]}: dip.prior_strength/prior_variance replace alpha, beta and prior_reduction; "
                             "set one form")
        if self.layers is not None:
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"dip.layers lists a block twice: {self.layers}")
            if any(i < 0 for i in self.layers):
                raise ValueError(f"dip.layers: block indices are >= 0, got {self.layers}")
        return self

    def prior_weights(self) -> tuple[float, float, str]:
        """(α, β, reduction) for dip_prior. κ, λp are the `mean` form with α = κ/λp, β = κ: per
        feature (κ/N)·(λ/λp − ln λ) up to a constant, against the NLL's ½·h·λ (h: the loss's
        curvature in that feature, which shrinks as 1/N too), so the balance does not depend on the
        width and κ is read against the NLL the noise costs. The `sum` form is the same prior with
        κ = N·β, a strength that grows with the model (0.05 nats on the tiny model's 512 variances,
        1.7 on SmolLM2's 17,280)."""
        if self.prior_strength is not None:
            return self.prior_strength / self.prior_variance, self.prior_strength, "mean"
        return self.alpha, self.beta, self.prior_reduction


DataFormat = Literal["gsm8k", "alpaca", "chat", "sharegpt", "prompt_completion", "text"]


class SyntheticSettings(_Section):
    n_train: int = Field(1200, gt=0, description="Training problems.")
    n_test: int = Field(300, gt=0, description="Problems in each test split (test-id, test-ood).")
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="Generator seed (same seed → byte-identical files).")


class DataSource(_Section):
    path: str = Field(description="'synthetic', a local JSONL/Parquet path, or a datasets hub name.")
    weight: float = Field(1.0, gt=0, description="Share of the mixture, relative to the other sources' weights.")
    format: Optional[DataFormat] = Field(None, description="This source's format (default: data.format).")


class DataSettings(_Section):
    # The tag names the branch a value took, so a bad mixture reports its own error, not "expected a string".
    train: Annotated[Union[Annotated[str, Tag("<path>")], Annotated[list[DataSource], Tag("<mixture>")]],
                     Discriminator(lambda v: "<mixture>" if isinstance(v, (list, tuple)) else "<path>")] = Field(
        "synthetic", description="'synthetic', a local JSONL/Parquet path, or a datasets hub name; or a weighted "
                                 "mixture: a list of {path, weight, format}.")
    format: DataFormat = Field("gsm8k", description="gsm8k (question/answer) | alpaca | chat (OpenAI messages) | "
                                                    "sharegpt (conversations, from/value) | prompt_completion | text (raw).")
    train_on_inputs: bool = Field(False, description="Count the prompt's tokens (and every chat turn's) in the loss too, "
                                                     "not only the answers'.")
    max_length: int = Field(192, gt=0, description="Tokens per training sequence.")
    overlength: Literal["truncate", "refuse"] = Field("truncate", description="What to do with longer examples.")
    packing: bool = Field(False, description="Pack several examples into each sequence; each keeps its own "
                                             "attention and positions (block-diagonal, as FlashAttention varlen).")
    packing_cross_document: bool = Field(
        False, description="Opt-in to the old packing where attention and positions run on across the packed "
                           "examples (cheaper masks; leaks context between examples).")
    limit: Optional[int] = Field(None, gt=0, description="Use only the first N training examples.")
    validation: Optional[str] = Field(None, description="Validation data for train.eval_every: a local JSONL/Parquet "
                                                        "path or a datasets hub name, in data.format (never a test split).")
    validation_fraction: Optional[float] = Field(
        None, gt=0, lt=1, description="Carve this fraction of the training rows out as validation data (a fixed "
                                      "permutation, seed 0); the rest trains.")
    synthetic: SyntheticSettings = SyntheticSettings()

    @model_validator(mode="after")
    def _check(self):
        if self.packing_cross_document and not self.packing:
            raise ValueError("data.packing_cross_document needs data.packing: true")
        if self.validation is not None and self.validation_fraction is not None:
            raise ValueError("set data.validation or data.validation_fraction, not both")
        if isinstance(self.train, list) and not self.train:
            raise ValueError("data.train: an empty mixture (list at least one {path, weight})")
        return self

    def sources(self) -> list[DataSource]:
        """The training sources: one (data.train as a string) or the mixture's, each with its format."""
        if isinstance(self.train, str):
            return [DataSource(path=self.train, format=self.format)]
        return [s.model_copy(update={"format": s.format or self.format}) for s in self.train]


class LoraSettings(_Section):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainSettings(_Section):
    method: Literal["full", "lora"] = Field("full", description="full fine-tuning or LoRA (peft).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    warmup_ratio: Optional[float] = Field(None, ge=0, lt=1, description="Warm-up as a fraction of the run's steps (overrides warmup_steps).")
    max_steps: Optional[int] = Field(300, gt=0, description="Optimizer steps (takes precedence over epochs).")
    epochs: Optional[float] = Field(None, gt=0, description="Epochs, used when max_steps is null.")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per rank per micro step.")
    grad_accum: int = Field(1, gt=0, description="Micro steps per optimizer step (ignored when global_batch_size is set).")
    global_batch_size: Optional[int] = Field(None, gt=0, description="Sequences per optimizer step over all ranks; accumulation = global / (micro x ranks), so any cluster size takes the same steps.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0: off).")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3.")
    offload: bool = Field(False, description="Offload optimizer state to CPU (DeepSpeed CPU Adam).")
    precision: Literal["fp32", "bf16"] = Field("fp32")
    save_every: int = Field(100, gt=0, description="Checkpoint every N optimizer steps (and at the end).")
    save_every_minutes: Optional[float] = Field(None, gt=0, description="Also checkpoint when this many minutes passed since the last one (a time-out loses at most that much).")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept.")
    log_every: int = Field(10, gt=0)
    lora: LoraSettings = LoraSettings()
    optimizer: Literal["adamw", "sam"] = Field(
        "adamw", description="adamw, or sam: sharpness-aware minimisation (Foret et al. 2021) around AdamW, two "
                             "forward/backward passes per micro-batch.")
    sam_rho: float = Field(0.05, gt=0, le=10, description="SAM's neighbourhood radius ρ (its paper's default 0.05).")
    eval_every: Optional[int] = Field(None, gt=0, description="Every N optimizer steps (and at the end): answer NLL "
                                                            "and token accuracy on the validation data (DIP on its mean path).")
    keep_best: bool = Field(False, description="Keep the checkpoint with the lowest validation NLL and export it "
                                               "(needs train.eval_every).")
    early_stopping_patience: Optional[int] = Field(
        None, gt=0, description="Stop after this many validations without a new lowest NLL (needs train.eval_every).")
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="How far below the lowest validation NLL so far a new one must be to reset the "
                               "patience count (the HF Trainer's early_stopping_threshold); the best checkpoint is "
                               "the lowest regardless.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers (as the HF Trainer's report_to): each run's recipe, every logged step, then "
                    "its eval scores; a study's runs grouped. Configured by each tracker's own environment variables.")
    gradient_checkpointing: bool = Field(
        False, description="Keep only each block's input for backward and recompute the block (less activation "
                           "memory, one more forward per block); DIP noise replays identically.")

    @model_validator(mode="after")
    def _check(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if self.optimizer == "sam" and self.zero_stage == 3:
            raise ValueError("train.optimizer sam needs train.zero_stage 0, 1 or 2 (ZeRO-3 partitions the weights "
                             "SAM must perturb as a whole)")
        if self.offload and self.zero_stage < 2:
            raise ValueError("train.offload needs train.zero_stage 2 or 3")
        if (self.keep_best or self.early_stopping_patience) and self.eval_every is None:
            raise ValueError("train.keep_best and train.early_stopping_patience need train.eval_every")
        return self


class SlurmSettings(_Section):
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0, description="0: CPU nodes, launch.procs_per_node ranks on gloo.")
    eval_gpus: int = Field(1, ge=1, description="GPUs of the eval job (vLLM) when gpus_per_node > 0.")
    signal_margin_s: Optional[int] = Field(None, ge=10, description="USR1 this long before a job's time limit: ranks "
                                           "save a checkpoint and the job requeues itself (default 180 s; a full "
                                           "fine-tune's train job: sized to its checkpoint, launch/slurm.py).")
    mem: Optional[str] = Field(None, description="Host memory per node (sbatch --mem): e.g. 500G, or 0 for all of "
                                                 "the node's; default: estimated per stage from the model's size.")
    cpus_per_task: Optional[int] = Field(None, gt=0)
    partition: Optional[str] = None
    time: Optional[str] = Field(None, description="Slurm time limit, e.g. 04:00:00.")
    account: Optional[str] = None
    launcher: Literal["torchrun", "deepspeed"] = Field("torchrun", description="What spawns per-node ranks inside the job.")
    extra_sbatch: list[str] = Field(default_factory=list, description="Extra '#SBATCH' option lines, e.g. '--qos=high'.")
    env: dict[str, str] = Field(default_factory=dict, description="Exports in the job (NCCL_SOCKET_IFNAME, HF_HOME, ...).")

    # Everything here is rendered into a shell script: only values that cannot break out of it.
    @field_validator("partition", "account")
    @classmethod
    def _plain(cls, v):
        if v is not None and not SLURM_NAME.fullmatch(v):
            raise ValueError("expected letters, digits and . _ , - only")
        return v

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            v = str(v)  # `mem: 0` in YAML, or launch.slurm.mem=0 on the command line
        if v is not None and not isinstance(v, str):
            raise ValueError("expected a Slurm memory size: a whole number with an optional K, M, G or T (0: all of the node's)")
        if v is not None and not SLURM_MEM.fullmatch(v):
            raise ValueError("expected a Slurm memory size: a whole number with an optional K, M, G or T (0: all of the node's)")
        return v

    @field_validator("time")
    @classmethod
    def _time(cls, v):
        if v is not None and not SLURM_TIME.fullmatch(v):
            raise ValueError("expected a Slurm time: MINUTES, HH:MM:SS, D-HH, D-HH:MM[:SS] or UNLIMITED")
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _extra(cls, v):
        for line in v:
            if not SBATCH_OPTION.fullmatch(line):
                raise ValueError(f"{line!r}: expected one option like '--qos=high' (no spaces, quotes or shell characters)")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v):
        for k, val in v.items():
            if not ENV_NAME.fullmatch(k):
                raise ValueError(f"{k!r}: expected a variable name (letters, digits, _)")
            if CONTROL.search(val):
                raise ValueError(f"{k}: the value has a newline or control character")
        return v


SLURM_NAME = re.compile(r"[A-Za-z0-9._,-]+")
SLURM_MEM = re.compile(r"\d+[KMGT]?")
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE")
SBATCH_OPTION = re.compile(r"(#SBATCH[ \t]+)?--?[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9._,:/@%+=-]+)?")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:_-]*")


class LaunchSettings(_Section):
    launcher: Literal["deepspeed", "torchrun", "single"] = Field("deepspeed")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="cuda: refuse to train without a usable GPU; auto: GPUs when present.")
    procs_per_node: Optional[int] = Field(None, gt=0, description="Ranks per node (default: GPUs, or 2 on CPU).")
    master_port: Optional[int] = Field(None, gt=0, lt=65536, description="Default: a free port.")
    master_addr: Optional[str] = None
    hostfile: Optional[str] = Field(None, description="deepspeed hostfile ('host slots=N' lines) for multi-node.")
    timeout_s: Optional[int] = Field(None, gt=0, description="Time-out of a local training launch in seconds; none "
                                     "unless set (a paper recipe on one node trains for hours). A Slurm job is "
                                     "bounded by its own time limit.")
    collective_timeout_s: int = Field(1800, ge=10, description="A rank waiting this long in a collective (a peer hung, "
                                      "its node died) fails the run instead of waiting forever.")
    slurm: SlurmSettings = SlurmSettings()

    @field_validator("master_addr")
    @classmethod
    def _addr(cls, v):
        if v is not None and not HOST_NAME.fullmatch(v):
            raise ValueError("expected a host name or IP address")
        return v


class ExportSettings(_Section):
    dtype: Literal["float32", "bfloat16"] = Field("float32")
    tolerance: float = Field(1e-5, gt=0, description="Max |logit difference| exported vs trained mean mode.")
    merge_lora: bool = Field(True, description="LoRA runs: merge the adapters into the weights (a full model), or "
                                               "false: write a PEFT adapter directory for the base (full runs export whole).")


EvalTask = Literal["arith-id", "arith-ood", "arith-perturbed", "arith-val", "gsm8k", "gsm8k_cot",
                   "gsm8k_cot_self_consistency", "gsm8k-perturbed"]


class EvalSettings(_Section):
    engine: Literal["vllm", "hf"] = Field("vllm")
    tasks: list[EvalTask] = Field(default_factory=lambda: ["arith-id", "arith-ood", "arith-perturbed"])
    shots: int = Field(0, ge=0, description="Few-shot examples (lm-evaluation-harness uses 5 for gsm8k).")
    limit: Optional[int] = Field(None, gt=0, description="Evaluate only the first N problems per task.")
    max_new_tokens: Optional[int] = Field(
        None, gt=0, description="Generation budget; default each task's own (gsm8k: lm-eval's 256; the arithmetic "
                                "tasks: 48), capped with a note where the model's context is shorter.")
    chat: Literal["none", "single", "multiturn"] = Field(
        "none", description="Chat rendering as lm-eval's --apply_chat_template (single) or with "
                            "--fewshot_as_multiturn (multiturn).")
    answer_nll: bool = Field(True, description="Teacher-forced NLL of the reference answers (one more prefill per "
                                               "problem on the same engine; the report's NLL columns need it).")
    harness_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks run on every "
                                     "model through the same engine (gsm8k/gsm8k_cot/dipnet_arith_* from local data).")
    gsm8k_path: Optional[str] = Field(None, description="Directory with GSM8K train.jsonl/test.jsonl (default: ../shared/data/gsm8k if present, else the hub).")
    noise_sigmas: list[float] = Field(default_factory=list, description="Embedding-noise sweep σ values (hf engine).")
    dip_mode: str = Field("mean", description="mean | average:k (hf engine only).")
    max_model_len: Optional[int] = Field(None, gt=0, description="Bound on the context the engine serves (default: the "
                                         "model's own, from its config); a prompt that fills it is scored wrong and named (over_long), never cut.")
    tensor_parallel_size: Optional[int] = Field(None, gt=0, description="vLLM on GPUs: GPUs per engine (default: every GPU "
                                                "this process sees, the most that divides the model's attention and KV heads).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM on GPUs: the share of each GPU's memory "
                                          "the engine may take (weights, activations, KV cache).")
    eval_base: bool = Field(True, description="Also evaluate the base model.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0: greedy, the default).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens reaching this probability.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0: all).")
    samples: int = Field(1, ge=1, le=1024, description="Completions per problem (n); > 1 adds maj@k, pass@k and diversity.")
    sampling_seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the sampled completions (same seed, same "
                                                                "engine: the same samples).")
    k: list[int] = Field(default_factory=list, description="The k of maj@k and pass@k (default: 1 and eval.samples).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Inference precision. auto: the precision dipnet trained the model in (export.json), "
                            "bfloat16 only where it runs natively (a GPU, or a CPU with AVX512-BF16/AMX); a model "
                            "dipnet did not train: vLLM in bfloat16 on a GPU, float32 otherwise. bfloat16 on a CPU "
                            "with AVX512-BF16/AMX: vLLM ~1.7x faster (SmolLM2-135M, bench/eval_throughput.py).")

    @model_validator(mode="after")
    def _sampling(self):
        try:
            self.sampling().check()
        except UsageError as exc:  # one rule, the engine's: pydantic reports a ValueError
            raise ValueError(str(exc)) from None
        return self

    def sampling(self):
        from dipnet.eval.sampling import Sampling

        return Sampling(n=self.samples, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        seed=self.sampling_seed, k=tuple(self.k))

    @field_validator("dip_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v != "mean" and not (v.startswith("average:") and v[8:].isdigit() and int(v[8:]) > 0):
            raise ValueError("expected 'mean' or 'average:K' with K a positive integer")
        return v

    @field_validator("harness_tasks")
    @classmethod
    def _harness_names(cls, v):
        for t in v:  # lm-eval task names: they reach file names of its output
            if not t or len(t) > 100 or not all(c.isalnum() or c in "_-." for c in t) or t.startswith("."):
                raise ValueError(f"harness task name {t!r}: expected letters, digits, '_', '-', '.'")
        return v

    @field_validator("noise_sigmas")
    @classmethod
    def _sigmas(cls, v):
        if any(x < 0 for x in v):
            raise ValueError("σ values must be >= 0")
        return v


class Comparison(_Section):
    variant: str
    against: str
    task: str


class ReportSettings(_Section):
    baseline: str = Field("sft", description="Variant every other is compared against.")
    bootstrap: int = Field(2000, gt=0, description="Bootstrap resamples for CIs.")
    smoothness: bool = Field(True, description="Measure input smoothness of each trained model.")
    primary: Optional[Comparison] = Field(
        None, description="The study's one declared comparison (variant − against, on task, paired by seed): read "
                          "unadjusted; every other comparison's p-value is Holm-adjusted.")
    compare: list[tuple[str, str]] = Field(default_factory=list, description="More [variant, against] pairs, on "
                                                                            "every task, beside each variant − baseline.")
    equivalence_margin: float = Field(0.05, gt=0, le=1, description="± accuracy (a fraction) within which an "
                                                                   "equivalence test (TOST) may call two variants equal.")
    lambda_diagnostics: bool = Field(True, description="For runs with DIP projections: the noise's cost (ΔNLL), λ's "
                                                       "agreement across seeds and with the loss's curvature, λ histograms.")


class StudySettings(_Section):
    match: Literal["steps", "tokens", "time"] = Field("steps", description="What is held equal across variants.")
    tuned_by: Optional[str] = Field(None, description="The sweep recipe whose validation runs chose these settings: "
                                                      "a seed shared with it is refused (selection on the reported runs).")


SECTIONS = ("run", "model", "dip", "data", "train", "launch", "export", "eval", "report", "study")


class Recipe(_Section):
    run: RunSettings = RunSettings()
    model: ModelSettings = ModelSettings()
    dip: DipSettings = DipSettings()
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    launch: LaunchSettings = LaunchSettings()
    export: ExportSettings = ExportSettings()
    eval: EvalSettings = EvalSettings()
    report: ReportSettings = ReportSettings()
    study: StudySettings = StudySettings()
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> overrides ('dip.method': none, ...).")
    seeds: list[int] = Field(default_factory=list, description="Seeds per variant (default: [run.seed]).")

    @model_validator(mode="after")
    def _validation_data(self):
        if self.train.eval_every is not None and self.data.validation is None and self.data.validation_fraction is None:
            raise ValueError("train.eval_every needs validation data: data.validation or data.validation_fraction")
        return self

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v):
        for name in v:
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"variant name {name!r}: expected a plain name ({NAME_RULE})")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        bad = [x for x in v if not 0 <= x <= MAX_SEED]
        if bad:
            raise ValueError(f"seeds must be between 0 and {MAX_SEED}, got {bad[0]}")
        return v

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.run.name}")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def section_hash(self, *names: str) -> str:
        """Content hash of the named sections (what a stage reads), for skip decisions."""
        d = self.to_dict()
        blob = json.dumps({n: d[n] for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise UsageError(f"override '{text}': expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UsageError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise UsageError(f"override '{key}': '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(raw: dict, overrides: dict[str, Any] | list[str]) -> dict:
    out = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for k, v in items:
        set_dotted(out, k, v)
    return out


def flatten_overrides(ov: dict, prefix: str = "") -> dict[str, Any]:
    """{'dip': {'alpha': 1}, 'train.lr': 2} -> {'dip.alpha': 1, 'train.lr': 2}: a variant's nested
    sections merge key by key into the recipe instead of replacing whole sections."""
    flat: dict[str, Any] = {}
    for k, v in ov.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten_overrides(v, key + "."))
        elif isinstance(v, dict):
            continue  # `dip: {}`: no change
        else:
            flat[key] = v
    return flat


# Keys a variant may not set: they name the study itself, not one of its runs.
VARIANT_FORBIDDEN = ("variants", "seeds", "run.name", "run.output_dir")


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys at a dotted location of the schema, for 'did you mean' suggestions."""
    model: Any = Recipe
    for part in loc:
        if part.isdigit() and model is DataSettings:  # data.train.<i>: a mixture's source
            model = DataSource
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        if (model, part) == (DataSettings, "train"):
            model = DataSettings  # a path or a mixture: the index that follows says which
            continue
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _describe_expected(err: dict) -> str:
    typ = err["type"]
    ctx = err.get("ctx") or {}
    simple = {
        "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
        "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
        "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
        "dict_type": "a mapping", "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys",
        "finite_number": "a finite number",
    }
    if typ in simple:
        return f"expected {simple[typ]}"
    if typ == "literal_error":
        return f"expected one of {ctx.get('expected')}"
    if typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sym = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        bound = next(iter(ctx.values())) if ctx else "?"
        return f"expected a value {sym} {bound}"
    msg = err["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def format_validation_error(exc: ValidationError, source: str) -> str:
    """First pydantic error as one line naming the dotted key (errors are fixed one at a time)."""
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"] if not str(p).startswith("<"))  # not a union's branch tag
    dotted = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(tuple(loc[:-1]))
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)" if close else (
            f" (valid keys here: {', '.join(valid)})" if valid else "")
        return f"{source}: unknown key '{dotted}'{hint}"
    got = err.get("input")
    got_s = "" if isinstance(got, (dict, list)) or err["type"].startswith("value_error") else f", got {got!r}"
    where = f"'{dotted}'" if dotted else "recipe"
    return f"{source}: {where}: {_describe_expected(err)}{got_s}"


def validate_dict(raw: dict, source: str) -> Recipe:
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a mapping of sections (run, model, dip, ...), got {type(raw).__name__}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, source)) from None
    # Each variant must itself give a valid recipe; its keys are checked like the file's.
    for name, ov in recipe.variants.items():
        if not isinstance(ov, dict):
            raise UsageError(f"{source}: 'variants.{name}': expected a mapping of overrides")
        flat = flatten_overrides(ov)
        for key in [k for k in ov if str(k).split(".")[0] in ("variants", "seeds")] + list(flat):
            if key in VARIANT_FORBIDDEN or key.startswith(("variants.", "seeds.")):
                raise UsageError(f"{source}: 'variants.{name}.{key}': a variant cannot set {key.split('.')[0] if key.startswith(('variants', 'seeds')) else key} "
                                 "(it belongs to the whole study; set it at the top level)")
        try:
            Recipe.model_validate(apply_overrides({k: v for k, v in raw.items() if k not in ("variants", "seeds")}, flat))
        except ValidationError as exc:
            raise UsageError(format_validation_error(exc, f"{source} (variant '{name}')")) from None
        except UsageError as exc:
            raise UsageError(f"{source} (variant '{name}'): {exc}") from None
    if recipe.variants and recipe.report.baseline not in recipe.variants and len(recipe.variants) > 1:
        raise UsageError(f"{source}: 'report.baseline': '{recipe.report.baseline}' is not one of the variants {sorted(recipe.variants)}")
    named = [("report.primary", (recipe.report.primary.variant, recipe.report.primary.against))] if recipe.report.primary else []
    for where, names in named + [("report.compare", pair) for pair in recipe.report.compare]:
        unknown = [n for n in names if n not in recipe.variants and n != "base"]
        if unknown:
            raise UsageError(f"{source}: '{where}': '{unknown[0]}' is not one of the variants {sorted(recipe.variants)}")
    if recipe.report.primary and recipe.report.primary.task not in recipe.eval.tasks:
        raise UsageError(f"{source}: 'report.primary.task': '{recipe.report.primary.task}' is not one of eval.tasks "
                         f"{list(recipe.eval.tasks)}")
    if recipe.study.tuned_by:
        check_fresh_seeds(recipe, source)
    # A control names the dip run it replays: a variant here, or a model directory that exists now.
    # (Expanding the runs is only paid by a recipe that has a control.)
    has_control = recipe.dip.method in CONTROL_METHODS or any(
        flatten_overrides(ov).get("dip.method") in CONTROL_METHODS for ov in recipe.variants.values())
    for src in sorted({r.dip.source for _, _, r in expand_runs(recipe) if r.dip.method in CONTROL_METHODS}
                      if has_control else ()):
        if src not in recipe.variants and not (Path(src).expanduser() / "dip" / "dip.safetensors").is_file():
            raise UsageError(f"{source}: 'dip.source': '{src}' is neither a variant of this recipe nor a model "
                             "directory with dip/dip.safetensors")
    _check_paths(recipe, source)
    return recipe


def check_fresh_seeds(recipe: Recipe, source: str) -> None:
    """A study must not report the runs its settings were chosen on: the seeds of `study.tuned_by`
    (the sweep; a path relative to the working directory, else to this recipe's) and this
    recipe's must not meet."""
    path = Path(recipe.study.tuned_by).expanduser()
    if not path.is_absolute() and not path.is_file():
        path = Path(source).parent / path
    if not path.is_file():
        raise UsageError(f"{source}: 'study.tuned_by': {recipe.study.tuned_by} is not a recipe file")
    sweep = read_yaml(path)
    seeds = None
    if isinstance(sweep, dict):
        run = sweep.get("run") if isinstance(sweep.get("run"), dict) else {}
        seeds = sweep.get("seeds") or [run.get("seed", 0)]
    if not isinstance(seeds, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise UsageError(f"{path}: 'seeds': expected a list of integers")
    shared = sorted(set(seeds) & set(recipe.seeds or [recipe.run.seed]))
    if shared:
        raise UsageError(f"{source}: 'seeds': {shared} were also the seeds of {recipe.study.tuned_by}, which chose this "
                         "recipe's settings on them: report fresh seeds")


def _check_paths(recipe: Recipe, source: str) -> None:
    from dipnet.pipeline.pretrained import SOURCES

    base = recipe.model.base
    if base.endswith(".gguf"):
        if not Path(base).expanduser().is_file():
            raise UsageError(f"{source}: 'model.base': no such GGUF file: {base}")
    elif base != "tiny" and base not in SOURCES and (base.startswith((".", "/", "~")) or Path(base).exists()):
        if not Path(base).expanduser().is_dir():
            raise UsageError(f"{source}: 'model.base': no such model directory: {base}")
    mixture = isinstance(recipe.data.train, list)
    for key, path in [(f"data.train.{i}.path" if mixture else "data.train", s.path)
                      for i, s in enumerate(recipe.data.sources())] + [("data.validation", recipe.data.validation)]:
        if path is None or path == "synthetic":
            continue
        if path.endswith((".jsonl", ".json", ".parquet")) or path.startswith((".", "/", "~")):
            if not Path(path).expanduser().is_file():
                raise UsageError(f"{source}: '{key}': no such file: {path}")
    if recipe.data.validation == "synthetic":
        raise UsageError(f"{source}: 'data.validation': synthetic data has no validation split; "
                         "use data.validation_fraction")
    if recipe.launch.hostfile and not Path(recipe.launch.hostfile).expanduser().is_file():
        raise UsageError(f"{source}: 'launch.hostfile': no such file: {recipe.launch.hostfile}")
    if recipe.eval.gsm8k_path and not Path(recipe.eval.gsm8k_path).expanduser().is_dir():
        raise UsageError(f"{source}: 'eval.gsm8k_path': no such directory: {recipe.eval.gsm8k_path}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the YAML default keeps the last one silently)."""


def _mapping_no_duplicates(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` merges are allowed to be overridden by explicit keys
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                    key_node.start_mark) from None
        if key in seen:
            raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key, line, first):
        self.key, self.line, self.first = key, line, first


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def _count_values(obj, limit: int) -> int:
    """Values in the tree as if every alias were expanded; stops counting past `limit`."""
    n, stack = 0, [obj]
    while stack:
        cur = stack.pop()
        n += 1
        if n > limit:
            return n
        if isinstance(cur, dict):
            stack.extend(cur.keys())
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return n


def parse_yaml_text(data: bytes, source: str):
    """YAML bytes -> Python objects, bounded: size, UTF-8, duplicate keys, alias expansion."""
    if len(data) > MAX_RECIPE_BYTES:
        raise UsageError(f"{source}: {len(data)} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise UsageError(f"{source}: line {exc.line}: duplicate key '{exc.key}' (first at line {exc.first})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{source}:{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply") from None
    if _count_values(raw, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:
        raise UsageError(f"{source}: expands to more than {MAX_RECIPE_VALUES} values (YAML aliases?); "
                         "a recipe is a few hundred")
    return raw


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such recipe file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"{p}: cannot read ({exc.strerror or exc})") from None
    raw = parse_yaml_text(data, str(p))
    return {} if raw is None else raw  # an empty file: every default; `False` or `0` is no recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises UsageError with one line on any problem."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_dict(raw, str(path))


def expand_runs(recipe: Recipe) -> list[tuple[str, int, Recipe]]:
    """The (variant, seed, recipe) triples a study trains, interleaved by seed (sft-s0, dip-s0,
    sft-s1, dip-s1, ...): runs share one launch one after another, so interleaving spreads a
    machine's drift over every variant instead of charging it to the last one trained.
    No variants: one run named 'main'."""
    raw = recipe.to_dict()
    raw.pop("variants"), raw.pop("seeds")
    seeds = recipe.seeds or [recipe.run.seed]
    variants = recipe.variants or {"main": {}}
    runs = []
    for seed in seeds:
        for name, ov in variants.items():
            r = Recipe.model_validate(apply_overrides(raw, {**flatten_overrides(ov), "run.seed": seed}))
            runs.append((name, seed, r))
    return runs
