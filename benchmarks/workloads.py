"""The prompts the benchmarks generate from: reasoning-gym questions under Pólya few-shot prompts.

Built with the project's own code paths (``manyways.data.load_problems`` and
``manyways.heuristics.render_heuristic_messages`` on the polya_v1 catalogue), so the prompts are
exactly what the generate stage sends.
"""

from __future__ import annotations

from dataclasses import dataclass

from manyways.schema import Problem

ARITHMETIC_OPTIONS = {
    "min_terms": 2,
    "max_terms": 3,
    "min_digits": 1,
    "max_digits": 2,
    "operators": ["+", "-", "*"],
    "allow_parentheses": False,
    "allow_negation": False,
}


@dataclass(frozen=True)
class Prompt:
    """One (problem, heuristic) pair and the chat messages the generate stage would send."""

    problem: Problem
    heuristic_id: str
    messages: list[dict[str, str]]


def arithmetic_problems(n: int, seed: int = 11) -> list[Problem]:
    """``n`` basic_arithmetic problems from reasoning-gym (offline, deterministic)."""
    from manyways.data import load_problems
    from manyways.data.sources import GymSource

    source = GymSource(task="basic_arithmetic", size=n, seed=seed, options=ARITHMETIC_OPTIONS)
    return list(load_problems(source).problems)


def heuristic_prompts(n_problems: int, n_heuristics: int, n_exemplars: int = 2) -> list[Prompt]:
    """Every problem under each of the first ``n_heuristics`` heuristics, problem-major."""
    from manyways.heuristics import load_catalogue, render_heuristic_messages

    heuristics = load_catalogue().select(n_heuristics)
    return [
        Prompt(p, h.id, render_heuristic_messages(p.question, h, n_exemplars=n_exemplars))
        for p in arithmetic_problems(n_problems)
        for h in heuristics
    ]


def long_context_messages(tokenizer: object, target_tokens: int) -> list[dict[str, str]]:
    """A chat whose prompt is about ``target_tokens`` tokens: few-shot text repeated, then a
    request that makes the model keep writing (so decode runs its full length)."""
    from manyways.heuristics import load_catalogue

    filler = " ".join(e.solution for h in load_catalogue().heuristics for e in h.exemplars)
    ask = "\n\nNow list the whole numbers from 1 to 500, separated by commas."
    words = filler.split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix of the filler that keeps the prompt within target
        mid = (lo + hi + 1) // 2
        messages = [{"role": "user", "content": " ".join(words[:mid]) + ask}]
        if prompt_length(tokenizer, messages) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    return [{"role": "user", "content": " ".join(words[:lo]) + ask}]


def prompt_length(tokenizer: object, messages: list[dict[str, str]]) -> int:
    """Tokens of ``messages`` under the chat template, with the assistant turn opened."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


class RequestCapture:
    """A stand-in back-end that records the requests a stage sends and answers with empty
    samples (so the stage's own code builds the requests: prompts, seeds, limits, stop strings)."""

    name = "capture"
    model_id = "capture"

    def __init__(self) -> None:
        self.requests: list = []

    def generate(self, requests: list, progress: object = None) -> list:
        from manyways.backends.protocol import GenSample

        self.requests += list(requests)
        return [[GenSample("", "stop", 0, 0) for _ in r.seeds] for r in requests]


def demo_generate_requests(
    config_path: str = "configs/tiny_cpu.yaml", shards: int = 1
) -> tuple[list, object]:
    """The requests the generate stage sends for the first ``shards`` shards of ``config_path``
    (its data.train problems, heuristics.n / exemplars, generate.samples / max_new_tokens /
    temperature / stop, seeds from run.seed), captured from ``GenerateWorker`` itself; with the
    config. One shard of ``configs/tiny_cpu.yaml`` is 20 problems x 4 heuristics x 4 samples = 320
    rows, four batches of its ``batch_size: 80``."""
    from manyways.artifacts import chunks
    from manyways.config import load_config
    from manyways.stages.generate import GenerateWorker, load_train_problems, selected_heuristics

    cfg = load_config(config_path)
    if cfg.generate.adaptive.enabled:
        raise ValueError("demo_generate_requests captures fixed-k generation (generate.adaptive off)")
    problems, _ = load_train_problems(cfg)
    heuristics, _ = selected_heuristics(cfg)
    worker = GenerateWorker(cfg.to_dict(), [h.id if h else None for h in heuristics])
    capture = RequestCapture()
    worker.backend = capture
    for _, chunk in list(chunks(problems, cfg.generate.shard_size))[:shards]:
        worker({"problems": [p.__dict__ for p in chunk]})
    return capture.requests, cfg
