"""Experiment configuration: one YAML per experiment, read into typed, frozen sections.

Each stage owns one small section; the top-level :class:`Config` only contains them. Unknown
keys are errors that name the key; ``key=value`` overrides (dotted paths, YAML values) are
applied before validation. TRL's own options are nested dicts passed through untouched.
Config is data: nothing in it is executed.

CPU command: ``manyways config show configs/tiny_cpu.yaml generate.samples=2``
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from manyways.backends.config import BackendConfig
from manyways.data.sources import GymSource, ProblemSource
from manyways.keyuse import shadowed_trl_keys
from manyways.models import DEFAULT_MODEL


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RunSection(Section):
    name: str = Field("run", description="Run name: outputs go to <root>/<name>/.")
    root: str = Field("runs", description="Directory holding run directories.")
    seed: int = Field(0, description="Global seed; every unit of work derives its own from it.")


class ModelSection(Section):
    name: str = Field(DEFAULT_MODEL, description="The base model: a hub id, a local dir, or the default.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="Training/loading dtype.")


class DataSection(Section):
    train: ProblemSource = Field(
        default_factory=lambda: GymSource(task="basic_arithmetic", size=20),
        description="Questions the mid-training data is generated for.",
    )
    rl: ProblemSource | None = Field(None, description="RL problem set; None reuses train.")
    eval: dict[str, ProblemSource] = Field(default_factory=dict, description="Benchmarks by name.")
    skip_bad: bool = Field(False, description="Set bad rows aside (counted) instead of stopping.")


class HeuristicsSection(Section):
    catalogue: str = Field("configs/heuristics/polya_v1.yaml", description="Generation catalogue YAML.")
    taxonomy: str = Field("configs/heuristics/taxonomy_v1.yaml", description="64-heuristic taxonomy.")
    n: int | None = Field(4, ge=1, description="Use the catalogue's first n heuristics.")
    ids: list[str] | None = Field(None, description="Explicit heuristic ids (overrides n).")
    exemplars: int = Field(2, ge=0, description="Few-shot exemplars per prompt.")


class AdaptiveSection(Section):
    enabled: bool = Field(False, description="Sample in rounds; stop a pair once accept_target are correct.")
    accept_target: int = Field(1, ge=1, description="Correct samples wanted per (problem, heuristic).")
    max_samples: int = Field(8, ge=1, description="Upper bound of samples per pair.")
    round_size: int = Field(2, ge=1, description="Samples per pair per round.")


class GenerateSection(Section):
    mode: Literal["heuristic", "plain", "teacher"] = Field("heuristic", description="Prompting mode.")
    backend: BackendConfig = Field(default_factory=BackendConfig, description="Who generates.")
    teacher_model: str | None = Field(None, description="teacher mode: the model that generates.")
    samples: int = Field(4, ge=1, description="Samples per (problem, heuristic) pair.")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    shard_size: int = Field(8, ge=1, description="Problems per shard (the unit of resume and of Ray tasks).")
    executor: Literal["local", "ray"] = Field("local")
    workers: int = Field(1, ge=1, description="ray: actors, each loading the model once.")
    ray_address: str | None = Field(None, description="Existing Ray cluster; None starts a local one.")
    ray_num_cpus: int | None = Field(None, description="CPUs of a local Ray cluster started on demand.")
    max_retries: int = Field(2, ge=0, description="Retries of a failing batch before the shard fails.")
    adaptive: AdaptiveSection = Field(default_factory=AdaptiveSection)


class VerifySection(Section):
    timeout_s: float = Field(5.0, gt=0, description="Per-check time limit; overruns are killed.")
    max_infra_error_rate: float = Field(0.05, ge=0, le=1, description="Stop if more sandbox runs fail.")
    min_infra_checks: int = Field(
        20, ge=1, description="Code checks seen before the infra-error share may stop the stage."
    )


class ExecutorFields(Section):
    """Where a sampling or scoring stage runs its shards (as ``generate``'s keys of the same names)."""

    executor: Literal["local", "ray"] = Field(
        "local", description="local: in this process; ray: shards over Ray actors, one engine each."
    )
    workers: int = Field(1, ge=1, description="ray: actors, each loading its model once.")
    ray_address: str | None = Field(None, description="Existing Ray cluster; None starts a local one.")
    ray_num_cpus: int | None = Field(None, description="CPUs of a local Ray cluster started on demand.")


EXECUTOR_KEYS = ("executor", "workers", "ray_address", "ray_num_cpus")


class ScoreSection(ExecutorFields):
    scorer: Literal["judge", "reward_model", "none"] = Field(
        "judge",
        description="judge: P(Yes) of an LLM asked whether the trace follows its heuristic; "
        "reward_model: the logit of a sequence-classification reward model; none: 0 for all.",
    )
    model: str | None = Field(
        None, description="Judge or reward model; None = the base model (judge only; reward_model needs one)."
    )
    backend: BackendConfig = Field(default_factory=BackendConfig, description="Judge back-end.")
    batch_size: int = Field(8, ge=1, description="Attempts scored per judge / reward-model call.")
    include_incorrect: bool = Field(
        False,
        description="Also score attempts verified incorrect (the select 'incorrect' variant ranks them).",
    )
    max_tokens: int = Field(2048, ge=16, description="reward_model: longer conversations are truncated.")
    device: str | None = Field(
        None, description="reward_model: torch device; None = cuda if available else cpu."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="reward_model: weights dtype.")
    cache_dir: str | None = Field(
        None,
        description="Score cache directory; None = <MANYWAYS_CACHE>/scores. Not part of the fingerprint.",
    )


class SelectSection(Section):
    variant: Literal["best", "incorrect", "star"] = Field(
        "best",
        description="best: top-ranked correct trace per (problem, heuristic); incorrect: top-ranked "
        "verified-incorrect trace per pair (needs score.include_incorrect); star: one correct "
        "plain-mode trace per problem (needs generate.mode=plain).",
    )
    heuristics: int | None = Field(
        None, ge=1, description="Use only the first n generated heuristics (generate's catalogue order)."
    )
    budget_heuristics: int | None = Field(
        None, ge=1, description="Fixed budget: exactly n (the first n heuristics; n=1: one per problem) ..."
    )
    budget_problems: int | None = Field(
        None, ge=1, description="... times m problems drawn by seed; an error when the data has fewer."
    )
    seed: int = Field(0, description="Seed of the budget's problem draw.")
    think: Literal["strip", "keep"] = Field(
        "strip",
        description="A completion with a </think> block: strip = train on the text after it (verified "
        "again on its own), keep = train on the whole completion.",
    )

    @model_validator(mode="after")
    def _budget_pair(self) -> SelectSection:
        if (self.budget_heuristics is None) != (self.budget_problems is None):
            raise ValueError("select.budget_heuristics and select.budget_problems go together")
        return self


class LoraSection(Section):
    enabled: bool = Field(False, description="Train LoRA adapters (PEFT) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | str = Field("all-linear", description="Modules that get adapters.")
    merge: bool = Field(True, description="Merge adapters into the saved model (else save the adapter only).")


DEFAULT_MIDTRAIN_MAX_LENGTH = 1024


class MidtrainSection(Section):
    lora: LoraSection = Field(default_factory=LoraSection)
    epochs: float = Field(
        1.0, gt=0, description="Passes over the mid-training data (ignored when max_steps > 0)."
    )
    max_steps: int = Field(-1, description="Optimizer steps; -1 = derive from epochs.")
    learning_rate: float = Field(
        1e-5, gt=0, description="Peak learning rate (the paper's SFT setting is not published)."
    )
    batch_size: int = Field(4, ge=1, description="Sequences per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int | None = Field(
        None,
        ge=16,
        description="Longest example in tokens; longer ones are dropped (counted in the manifest, "
        "logged), all too long stops. The one length setting: TRL's max_length is this value. "
        "None = midtrain.trl.max_length if set, else 1024; both set and different is an error.",
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint every n steps (the unit of resume).")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept on disk.")
    keep_checkpoints_when_done: bool = Field(
        False,
        description="Keep checkpoints after the model is saved (they exist for resume; each holds "
        "weights and optimizer state, ~1.6 GB for a 135M model). When false, the last step writes "
        "no checkpoint (it would be deleted right after the model is saved).",
    )
    log_samples: bool = Field(
        True, description="Write samples.jsonl: the example ids each optimizer step consumed."
    )
    loss_head: Literal["auto", "completion", "trl"] = Field(
        "auto",
        description="LM head of the loss: completion = log-probs at the labelled positions only, bf16 "
        "matmuls, fp32 log-softmax (manyways.loss_head); trl = TRL's fused head; auto = completion on CPU.",
    )
    padding_free: bool = Field(
        True,
        description="Each micro-batch's examples run as one flattened sequence (TRL's padding_free: "
        "position ids restart per example, attention stays within each example), so no padding is "
        "computed; the loss and gradients are those of the padded batch (tested). The length limit "
        "is enforced by max_length's check.",
    )
    packed_attention: Literal["auto"] | bool = Field(
        "auto",
        description="With padding_free: attention per packed example (one causal attention each, "
        "fp32 softmax) instead of sdpa over the whole row with a block mask; the same result "
        "(manyways.packed_attention, tested). auto = true on CPU, where sdpa's masked backward is slow.",
    )
    trl: dict[str, Any] = Field(
        default_factory=dict, description="Passed to trl.SFTConfig untouched, over our defaults."
    )

    @model_validator(mode="after")
    def _trl_shadows_no_key(self) -> MidtrainSection:
        if problems := shadowed_trl_keys("midtrain", self.trl):
            raise ValueError("; ".join(problems))
        return self

    @property
    def length_limit(self) -> int:
        """The one length setting: ``max_length``, else 1024 (``trl.max_length`` is refused above)."""
        return self.max_length if self.max_length is not None else DEFAULT_MIDTRAIN_MAX_LENGTH


class RLSection(Section):
    format_reward: float = Field(0.0, ge=0, description="Weight of a \\boxed{} format reward; 0 = off.")
    num_generations: int = Field(
        4, ge=2, description="Completions per prompt (the GRPO group); the paper used 16."
    )
    batch_size: int = Field(
        4, ge=1, description="Completions per device per micro-batch (a multiple of the group)."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    beta: float = Field(
        0.0, ge=0, description="KL coefficient; 0 = no KL term and no reference model (the paper)."
    )
    loss_type: str = Field("dapo", description="TRL loss: grpo, dr_grpo, dapo, bnpo, cispo, ...")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantage scaling: group, batch or none (TRL's true / false: group / none)."
    )
    epsilon: float = Field(0.2, gt=0, description="Lower clip range of the importance ratio.")
    epsilon_high: float | None = Field(
        None, description="Upper clip range (DAPO clip-higher); None = epsilon."
    )
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature.")
    max_completion_length: int = Field(
        64, ge=1, description="Rollout length in tokens; the paper used 3,072."
    )
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the RL problems (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1 = derive from epochs.")
    save_steps: int = Field(25, ge=1, description="Checkpoint every n steps (the unit of resume).")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept on disk.")
    keep_checkpoints_when_done: bool = Field(
        False,
        description="Keep checkpoints after the model is saved (they exist for resume; each holds "
        "weights and optimizer state, ~1.6 GB for a 135M model). When false, the last step writes "
        "no checkpoint (it would be deleted right after the model is saved).",
    )
    use_vllm: bool = Field(False, description="Generate rollouts with vLLM (GPU only).")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate",
        description="colocate: vLLM in the trainer's processes; server: `trl vllm-serve` elsewhere.",
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    loss_head: Literal["auto", "completion", "trl"] = Field(
        "auto",
        description="LM head of the loss: completion = log-probs at the labelled positions only, bf16 "
        "matmuls, fp32 log-softmax (manyways.loss_head); trl = TRL's fused head; auto = completion on CPU.",
    )
    shared_prefix: bool = Field(
        True,
        description="With the completion loss head: compute each group's prompt once in the training "
        "forwards (one packed sequence per group, manyways.prefix_sharing); same log-probs and gradients.",
    )
    skip_zero_advantage: bool = Field(
        True,
        description="Completions whose advantage is zero (a group with equal rewards) run their "
        "training forward without autograd and no backward: with beta 0 their loss and gradient are "
        "exactly 0 (manyways.zero_advantage); same loss, gradients and metrics.",
    )
    trl: dict[str, Any] = Field(
        default_factory=dict, description="Passed to trl.GRPOConfig untouched, over our defaults."
    )

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_rewards_bool(cls, value: Any) -> Any:
        # TRL takes a bool too (its older spelling); a typo must fail here, not after a generation
        return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _trl_shadows_no_key(self) -> RLSection:
        if problems := shadowed_trl_keys("rl", self.trl):
            raise ValueError("; ".join(problems))
        return self


class EvaluateSection(ExecutorFields):
    samples: int = Field(8, ge=1, description="Completions per problem (n >= the largest k).")
    ks: list[int] | None = Field(None, description="k values; None = 1, 2, 4, ... n.")
    backend: BackendConfig = Field(default_factory=BackendConfig)
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for CIs.")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Extra models to evaluate, label -> name or path (besides base, midtrain, rl).",
    )
    include_base: bool = Field(True, description="Evaluate the base model (label 'base').")
    default_size: int = Field(
        16, ge=1, description="Problems per offline default benchmark (used when data.eval is empty)."
    )
    contamination_ngram: int = Field(
        13, ge=1, description="Word n-gram length of the training-set overlap report (data/contamination.py)."
    )
    exclude_ngram_overlaps: bool = Field(
        False,
        description="Also exclude evaluation problems sharing an n-gram with a training or RL question "
        "(exact normalised matches are always excluded).",
    )


class AnalyzeSection(Section):
    kernels: list[Literal["ngram", "embedding"]] = Field(default_factory=lambda: ["ngram"])
    ngram_dim: int | None = Field(
        4096,
        ge=1,
        description="Hashed n-gram features for whole-set Vendi (d x d eigenproblem); None = exact.",
    )
    judge_backend: BackendConfig = Field(default_factory=BackendConfig)
    judge_model: str | None = Field(None, description="Composition judge; None = the base model.")
    max_traces: int = Field(32, ge=0, description="Traces per model labelled by the composition judge.")
    judge_max_new_tokens: int | None = Field(
        None, ge=1, description="Token budget of one judge answer; None = the schema's longest answer."
    )
    judge_constrain: bool = Field(True, description="Constrain judge answers to the label JSON schema.")
    judge_context_tokens: int | None = Field(
        None, ge=1, description="Judge context; longer traces are counted too_long. None = the model's."
    )
    benchmarks: list[str] | None = Field(
        None, description="Evaluation benchmarks whose traces the judge labels; None = every math one."
    )
    judge_temperature: float = Field(0.0, ge=0, description="Judge sampling temperature; 0 = greedy.")
    judge_shard_size: int = Field(64, ge=1, description="Traces per judge shard (the unit of Ray tasks).")
    catalogue_taxonomy_map: str | None = Field(
        "configs/heuristics/catalogue_taxonomy_v1.yaml",
        description="Which taxonomy ids count as recognising each generation heuristic (judge validity).",
    )
    validity_per_heuristic: int | None = Field(
        None, ge=1, description="Catalogue exemplars per heuristic the judge labels for validity; None = all."
    )
    modes: bool = Field(True, description="Measure mode coverage of each evaluated model.")
    executor: Literal["local", "ray"] = Field("local", description="Where the judge runs.")
    workers: int = Field(1, ge=1, description="ray: judge actors, each loading the judge once.")
    ray_address: str | None = Field(None, description="Existing Ray cluster; None starts a local one.")
    ray_num_cpus: int | None = Field(None, description="CPUs of a local Ray cluster started on demand.")
    top_combinations: int = Field(10, ge=1, description="Most frequent heuristic combinations reported.")
    trace_samples: int = Field(3, ge=0, description="Mid-training traces per heuristic shown in the report.")


class ExperimentSection(Section):
    arms: list[str] = Field(
        default_factory=lambda: ["vanilla_rl", "polya_n4"],
        description="vanilla_rl, star_rl, distill_rl, polya_n<N>, incorrect_n<N> (incorrect_rl: "
        "N = heuristics.n), budget_<N>x<M>.",
    )
    teacher_model: str | None = Field(None, description="distill_rl: the teacher model.")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-arm dotted-key overrides, e.g. {polya_n4: {midtrain.learning_rate: 2e-5}}; "
        "only that arm's dependent stages are recomputed.",
    )
    jobs: int = Field(
        1,
        ge=1,
        description="Stage runs at once (manyways.schedule): > 1 runs them in worker processes with "
        "cores // jobs torch threads each; artifacts do not depend on it. Keep 1 where one stage "
        "fills the machine (a GPU per stage, Ray).",
    )


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    heuristics: HeuristicsSection = Field(default_factory=HeuristicsSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    verify: VerifySection = Field(default_factory=VerifySection)
    score: ScoreSection = Field(default_factory=ScoreSection)
    select: SelectSection = Field(default_factory=SelectSection)
    midtrain: MidtrainSection = Field(default_factory=MidtrainSection)
    rl: RLSection = Field(default_factory=RLSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    analyze: AnalyzeSection = Field(default_factory=AnalyzeSection)
    experiment: ExperimentSection = Field(default_factory=ExperimentSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def section_hash(self, *names: str) -> str:
        """sha256 of the named sections (all when none), for manifests and reuse."""
        data = self.to_dict()
        part = {n: data[n] for n in names} if names else data
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def apply_override(data: dict[str, Any], override: str, defaults: dict[str, Any] | None = None) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML.

    A section the file does not set is first filled with its defaults (from ``defaults``), so
    ``data.train.size=6`` changes the default source's size instead of replacing the source."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node, default = data, defaults or {}
    for part in parts[:-1]:
        default = default.get(part) if isinstance(default, dict) else None
        child = node.get(part)
        if child is None:
            child = node[part] = copy.deepcopy(default) if isinstance(default, dict) else {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r}")
        else:
            lines.append(f"{loc}: {err['msg']}")
    return f"{origin}: invalid config:\n  " + "\n  ".join(lines)


def config_from_dict(data: dict[str, Any], origin: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    origin = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    defaults = Config().to_dict() if overrides else None
    for ov in overrides:
        apply_override(data, ov, defaults)
    return config_from_dict(data, origin)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
