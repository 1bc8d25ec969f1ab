"""Counts, tokens and GPU-hours of one stage run, from its config alone (used by :mod:`manyways.plan`).

Every assumption is a field of :class:`Assumptions`; :data:`ASSUMPTIONS` is the one instance
``--plan`` and README's cost table use. Rates are for one GPU of ``Assumptions.gpu``; a model's
decode and read rates scale inversely with its parameter count (decoding is bound by reading the
weights), training costs 6 x parameters FLOPs per token.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from manyways.config import Config
from manyways.data.sources import ProblemSource

log = logging.getLogger(__name__)

SizeOf = Callable[[ProblemSource], int]


@dataclass(frozen=True)
class Assumptions:
    """Throughputs and mean lengths behind every estimate (one place; README quotes describe())."""

    gpu: str = "H100"
    decode_tok_s: float = 7500.0  # vLLM output tokens/s per GPU for a model of decode_params ...
    decode_params: float = 3.2e9  # ... (Llama-3.2-3B), many sequences in flight, prefix caching
    prompt_token_cost: float = 0.1  # a prompt token costs this fraction of a generated one
    read_tok_s: float = 40000.0  # tokens/s a model of read_params reads in one forward (scoring)
    read_params: float = 8.0e9  # (an 8B reward model)
    train_flops: float = 4.0e14  # 40% MFU of an H100's bf16 peak; 6 x params FLOPs per token
    train_gpus: int = 8  # GPUs of a training job (converts max_steps into sequences)
    train_accuracy: float = 0.5  # per-sample accuracy of generation on the training questions
    prompt_tokens_heuristic: int = 600  # heuristic prompt with its exemplars
    prompt_tokens_plain: int = 150  # a question alone (plain, rl, midtrain, evaluate)
    prompt_tokens_judge: int = 900  # composition judge: instructions + a trace
    completion_generate: int = 400  # mean generated tokens, each capped at its stage's maximum
    completion_teacher: int = 2000
    completion_rl: int = 1500
    completion_evaluate: int = 1300

    def describe(self) -> str:
        return (
            f"vLLM decodes {self.decode_tok_s:,.0f} tokens/s per {self.gpu} for a "
            f"{self.decode_params / 1e9:.1f}B model (a prompt token costs {self.prompt_token_cost:g} of "
            f"a generated one); a {self.read_params / 1e9:.0f}B scorer reads {self.read_tok_s:,.0f} tokens/s; "
            f"both scale inversely with parameters; training runs at {self.train_flops / 1e12:,.0f} "
            f"TFLOP/s (6 x parameters FLOPs per token); {self.train_accuracy:.0%} of generated samples are "
            f"correct; mean lengths: prompts {self.prompt_tokens_heuristic} (heuristic) / "
            f"{self.prompt_tokens_plain} (plain), completions {self.completion_generate} (generate), "
            f"{self.completion_teacher} (teacher), {self.completion_rl} (rl), "
            f"{self.completion_evaluate} (evaluate), each capped at the configured maximum."
        )


ASSUMPTIONS = Assumptions()

# parameters of the models the recipe names (others: read from the name, e.g. "-8B", "135m")
KNOWN_PARAMS: dict[str, float] = {
    "meta-llama/Llama-3.2-3B-Instruct": 3.21e9,
    "Skywork/Skywork-Reward-V2-Llama-3.1-8B": 8.03e9,
    "Qwen/QwQ-32B": 32.8e9,
}
_SIZE_RE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)([bm])(?![a-z])", re.I)


def model_params(name: str, default: float) -> float:
    """Parameter count of a model by name; ``default`` (the base model's) when it cannot be told."""
    if name in KNOWN_PARAMS:
        return KNOWN_PARAMS[name]
    match = _SIZE_RE.search(name.rsplit("/", 1)[-1])
    if match:
        return float(match.group(1)) * (1e9 if match.group(2).lower() == "b" else 1e6)
    return default


@dataclass(frozen=True)
class Estimate:
    """What one stage run does and costs. ``count`` is in ``unit``; tokens are totals."""

    what: str
    count: int
    unit: str
    samples: int = 0  # sequences generated
    tokens_in: int = 0  # prompt tokens, or tokens read (scoring) / trained on (midtrain)
    tokens_out: int = 0  # generated tokens
    gpu_hours: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


def plural(n: float, word: str) -> str:
    """``1 heuristic``, ``16 heuristics``, ``2.5 epochs``."""
    return f"{n:,g} {word}" if n == 1 else f"{n:,g} {word}s"


class _Cost:
    def __init__(self, cfg: Config, a: Assumptions):
        self.a = a
        self.base = model_params(cfg.model.name, a.decode_params)

    def params(self, model: str | None) -> float:
        return model_params(model, self.base) if model else self.base

    def decode(self, model: str | None, tokens_out: float, tokens_in: float) -> float:
        rate = self.a.decode_tok_s * self.a.decode_params / self.params(model)
        return (tokens_out + tokens_in * self.a.prompt_token_cost) / rate / 3600

    def read(self, model: str | None, tokens: float) -> float:
        return tokens / (self.a.read_tok_s * self.a.read_params / self.params(model)) / 3600

    def train(self, model: str | None, tokens: float) -> float:
        return 6 * self.params(model) * tokens / self.a.train_flops / 3600


def n_heuristics(cfg: Config) -> int:
    """Heuristics generate prompts with (the catalogue is a local file)."""
    if cfg.generate.mode == "plain":
        return 1
    if cfg.heuristics.ids:
        return len(cfg.heuristics.ids)
    from manyways.heuristics import load_catalogue

    total = len(load_catalogue(cfg.heuristics.catalogue).heuristics)
    return min(cfg.heuristics.n or total, total)


def _generate(cfg: Config, up: Mapping[str, Estimate], size: SizeOf, a: Assumptions) -> Estimate:
    g = cfg.generate
    problems, heur = size(cfg.data.train), n_heuristics(cfg)
    per = g.adaptive.max_samples if g.adaptive.enabled else g.samples
    samples = problems * heur * per
    teacher = g.mode == "teacher"
    model = g.teacher_model if teacher else (g.backend.model or cfg.model.name)
    out = min(a.completion_teacher if teacher else a.completion_generate, g.max_new_tokens)
    prompt = a.prompt_tokens_plain if g.mode == "plain" else a.prompt_tokens_heuristic
    hours = _Cost(cfg, a).decode(model, samples * out, samples * prompt)
    who = f" by {model}" if teacher else ""
    what = f"{problems:,} questions x {plural(heur, 'heuristic')} x {per} samples = {samples:,} samples{who}"
    detail = {"problems": problems, "heuristics": heur, "per_pair": per, "prompt": prompt, "completion": out}
    return Estimate(what, samples, "samples", samples, samples * prompt, samples * out, hours, detail)


def _verify(cfg: Config, up: Mapping[str, Estimate], size: SizeOf, a: Assumptions) -> Estimate:
    gen = up["generate"]
    correct = round(gen.samples * a.train_accuracy)
    what = f"{gen.samples:,} samples checked on CPU (~{correct:,} correct)"
    return Estimate(what, gen.samples, "samples", detail={**gen.detail, "correct": correct})


def _score(cfg: Config, up: Mapping[str, Estimate], size: SizeOf, a: Assumptions) -> Estimate:
    s, gen = cfg.score, up["generate"]
    if s.scorer == "none":
        return Estimate("no scorer (every trace scores 0)", 0, "traces")
    traces = gen.samples if s.include_incorrect else up["verify"].detail["correct"]
    tokens = traces * (gen.detail["prompt"] + gen.detail["completion"])
    model = s.model or cfg.model.name
    which = "all" if s.include_incorrect else "correct"
    what = f"{traces:,} {which} traces read by {model} ({s.scorer})"
    return Estimate(what, traces, "traces", 0, tokens, 0, _Cost(cfg, a).read(model, tokens))


def _select(cfg: Config, up: Mapping[str, Estimate], size: SizeOf, a: Assumptions) -> Estimate:
    sel, gen = cfg.select, up["generate"].detail
    problems, heur, per = gen["problems"], gen["heuristics"], gen["per_pair"]
    p_correct = 1 - (1 - a.train_accuracy) ** per  # a pair has a correct sample
    if sel.variant == "star":
        traces, what = round(problems * p_correct), "one correct plain trace per question"
    elif sel.variant == "incorrect":
        h = min(sel.heuristics or heur, heur)
        traces = round(problems * h * (1 - a.train_accuracy**per))
        what = f"one incorrect trace per (question, heuristic), {plural(h, 'heuristic')}"
    elif sel.budget_heuristics and sel.budget_problems:
        h, m = min(sel.budget_heuristics, heur), min(sel.budget_problems, problems)
        traces, what = h * m, f"fixed budget: {plural(h, 'heuristic')} x {m:,} questions"
    else:
        h = min(sel.heuristics or heur, heur)
        traces, what = (
            round(problems * h * p_correct),
            f"best correct trace per (question, heuristic), {plural(h, 'heuristic')}",
        )
    detail = {"trace_tokens": a.prompt_tokens_plain + gen["completion"]}
    return Estimate(f"{what}: ~{traces:,} traces", traces, "traces", detail=detail)


def _midtrain(cfg: Config, up: Mapping[str, Estimate], size: SizeOf, a: Assumptions) -> Estimate:
    m, sel = cfg.midtrain, up["select"]
    per_trace = min(sel.detail["trace_tokens"], m.length_limit)
    steps = m.max_steps
    if steps and steps > 0:
        seqs = steps * m.batch_size * m.grad_accum * a.train_gpus
        what = f"{steps:,} steps x {seqs // steps:,} sequences ({a.train_gpus} GPUs)"
    else:
        epochs = m.epochs
        seqs = round(sel.count * epochs)
        what = f"{sel.count:,} traces x {plural(epochs, 'epoch')}"
    tokens = seqs * per_trace
    return Estimate(what, seqs, "sequences", 0, tokens, 0, _Cost(cfg, a).train(cfg.model.name, tokens))


def _rl(cfg: Config, up: Mapping[str, Estimate], size: SizeOf, a: Assumptions) -> Estimate:
    r = cfg.rl
    prompts = size(cfg.data.rl or cfg.data.train)
    group = r.num_generations
    steps = r.max_steps
    if steps and steps > 0:
        completions = steps * r.batch_size * r.grad_accum * a.train_gpus
        what = f"{steps:,} steps, {completions:,} completions ({a.train_gpus} GPUs)"
    else:
        epochs = r.epochs
        completions = round(prompts * group * epochs)
        what = f"{prompts:,} prompts x {group} completions x {plural(epochs, 'epoch')}"
    out = completions * min(a.completion_rl, r.max_completion_length)
    tokens_in = completions * a.prompt_tokens_plain
    cost = _Cost(cfg, a)
    ref = 1 + (2 / 6 if r.beta > 0 else 0)  # a reference model's forward
    hours = cost.decode(cfg.model.name, out, tokens_in) + ref * cost.train(cfg.model.name, out + tokens_in)
    return Estimate(what, completions, "completions", completions, tokens_in, out, hours)


def _evaluate(cfg: Config, up: Mapping[str, Estimate], size: SizeOf, a: Assumptions) -> Estimate:
    from manyways.stages.evaluate import benchmarks

    e = cfg.evaluate
    models = int(e.include_base) + sum(k in up for k in ("midtrain", "rl")) + len(e.models)
    problems = sum(size(src) for src in benchmarks(cfg).values())
    samples = models * problems * e.samples
    out = samples * min(a.completion_evaluate, e.max_new_tokens)
    tokens_in = samples * a.prompt_tokens_plain
    hours = _Cost(cfg, a).decode(cfg.model.name, out, tokens_in)
    what = f"{plural(models, 'model')} x {problems:,} problems x {e.samples} samples = {samples:,} samples"
    return Estimate(what, samples, "samples", samples, tokens_in, out, hours, {"models": models})


def judge_budget(cfg: Config) -> int:
    """The judge's tokens per label: the configured cap, else the label schema's longest answer
    (what the analyze stage uses; the taxonomy file is read, no model is loaded)."""
    if cfg.analyze.judge_max_new_tokens is not None:
        return cfg.analyze.judge_max_new_tokens
    from manyways.composition import judge_schema, judge_token_budget
    from manyways.heuristics import load_taxonomy

    return judge_token_budget(judge_schema(load_taxonomy(cfg.heuristics.taxonomy).ids))


def _analyze(cfg: Config, up: Mapping[str, Estimate], size: SizeOf, a: Assumptions) -> Estimate:
    an = cfg.analyze
    models = up["evaluate"].detail["models"] if "evaluate" in up else 0
    # per model: composition labels, and mode labels (same traces); plus the mid-training traces
    judged = models * an.max_traces * (2 if an.modes else 1) + (an.max_traces if "select" in up else 0)
    judge_model = an.judge_model or cfg.model.name
    tokens_in, out = judged * a.prompt_tokens_judge, judged * judge_budget(cfg)
    what = f"{judged:,} traces labelled by the composition judge; {', '.join(an.kernels)} diversity"
    return Estimate(
        what, judged, "traces", judged, tokens_in, out, _Cost(cfg, a).decode(judge_model, out, tokens_in)
    )


def _validity(cfg: Config, up: Mapping[str, Estimate], size: SizeOf, a: Assumptions) -> Estimate:
    from manyways.analyses import validity_job
    from manyways.heuristics import load_taxonomy

    judged = len(validity_job(cfg, load_taxonomy(cfg.heuristics.taxonomy))[0].traces)
    judge_model = cfg.analyze.judge_model or cfg.model.name
    tokens_in, out = judged * a.prompt_tokens_judge, judged * judge_budget(cfg)
    what = f"{judged:,} catalogue exemplars labelled by the composition judge (its validity)"
    return Estimate(
        what, judged, "traces", judged, tokens_in, out, _Cost(cfg, a).decode(judge_model, out, tokens_in)
    )


ESTIMATORS: dict[str, Callable[[Config, Mapping[str, Estimate], SizeOf, Assumptions], Estimate]] = {
    "generate": _generate,
    "verify": _verify,
    "score": _score,
    "select": _select,
    "midtrain": _midtrain,
    "rl": _rl,
    "evaluate": _evaluate,
    "validity": _validity,
    "analyze": _analyze,
}


def estimate_stage(
    stage: str,
    cfg: Config,
    arm: str,
    upstream: Mapping[str, Estimate],
    size: SizeOf,
    a: Assumptions = ASSUMPTIONS,
) -> Estimate:
    """The estimate of one run of ``stage`` with config ``cfg``; ``upstream`` holds the estimates
    of its inputs by input name (generate, verify, select, ...)."""
    if stage not in ESTIMATORS:  # a stage added without an estimator: shown, not costed
        log.warning("no estimate for stage %r (arm %s): counted as 0 GPU-hours", stage, arm)
        return Estimate(f"no estimate for stage {stage!r}", 0, "-")
    return ESTIMATORS[stage](cfg, upstream, size, a)
