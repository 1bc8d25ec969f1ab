"""Run the composition judge over many labelling jobs, in shards, locally or on Ray.

A *job* is a list of traces to label against one menu (the 64-heuristic taxonomy for composition
and judge validity, or the n generation heuristics for mode assignment, one id per answer). Jobs
with the same menu are pooled (their prompts share the menu as a prefix, prefilled once per
batch), and each pool is cut into shards of ``analyze.judge_shard_size`` traces and run through
:func:`manyways.executor.map_shards` with the ``analyze`` section's executor settings: the worker
builds the judge back-end once (one model load per worker / Ray actor) and labels its shards; the
driver collects the labels in order. A judge back-end passed in (tests, or a caller that already
holds one) runs every shard in-process.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from manyways.backends.protocol import GenerationBackend
from manyways.composition import MAX_LABELS, ParsedLabels, label_traces
from manyways.executor import backend_gpus, map_shards
from manyways.heuristics import Taxonomy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeJob:
    """Traces to label against ``menu``; ``max_labels=1`` asks for one id per trace."""

    name: str
    menu: Taxonomy
    traces: list[str]
    questions: list[str | None]
    max_labels: int = MAX_LABELS


class JudgeWorker:
    """Labels one shard; builds the judge back-end on first use (one load per worker)."""

    def __init__(self, cfg_dict: dict[str, Any], backend: GenerationBackend | None = None):
        from manyways.config import config_from_dict

        self.cfg = config_from_dict(cfg_dict)
        self.backend = backend
        self._owned = backend is None  # a back-end it loads itself, it also closes

    def _backend(self) -> GenerationBackend:
        if self.backend is None:
            from manyways.backends.config import make_backend

            a = self.cfg.analyze
            self.backend = make_backend(
                a.judge_backend.model_copy(update={"model": None}), a.judge_model or self.cfg.model.name
            )
        return self.backend

    def close(self) -> None:
        """Release the judge back-end this worker loaded (the executor calls this when done)."""
        if self._owned and self.backend is not None:
            self.backend.close()
            self.backend = None

    def __call__(self, shard: dict[str, Any]) -> list[ParsedLabels]:
        a = self.cfg.analyze
        return label_traces(
            self._backend(),
            shard["menu"],
            shard["traces"],
            questions=shard["questions"],
            seed=self.cfg.run.seed + shard["offset"],
            max_new_tokens=a.judge_max_new_tokens,
            temperature=a.judge_temperature,
            constrain=a.judge_constrain,
            context_tokens=a.judge_context_tokens,
            max_labels=shard["max_labels"],
        )


def _make_worker(cfg_dict: dict[str, Any], backend: GenerationBackend | None) -> JudgeWorker:
    return JudgeWorker(cfg_dict, backend)


def _streams(jobs: list[JudgeJob]) -> list[tuple[JudgeJob, list[tuple[str, int]]]]:
    """Jobs with the same menu and label count pooled into one stream (in job order), so their
    shards fill the judge's batches and the menu prefix is prefilled once per batch instead of
    once per job; each stream lists (job name, trace count) to split the labels back."""
    pooled: dict[tuple[Any, int], tuple[JudgeJob, list[tuple[str, int]]]] = {}
    for job in jobs:
        key = (job.menu, job.max_labels)
        if key not in pooled:
            pooled[key] = (JudgeJob(job.name, job.menu, [], [], job.max_labels), [])
        stream, parts = pooled[key]
        stream.traces.extend(job.traces)
        stream.questions.extend(job.questions)
        parts.append((job.name, len(job.traces)))
    return list(pooled.values())


def run_jobs(
    cfg: Any, jobs: list[JudgeJob], judge: GenerationBackend | None = None
) -> dict[str, list[ParsedLabels]]:
    """Labels of every job, in trace order. ``judge`` given: all shards run here with it.

    Jobs that share a menu are pooled and cut into shards of ``analyze.judge_shard_size``
    traces; a trace's sampling seed depends on its place in its pool (the judge is greedy by
    default, where seeds do not matter)."""
    a = cfg.analyze
    streams = _streams(jobs)
    items: list[tuple[int, dict[str, Any]]] = []
    for s, (stream, _) in enumerate(streams):
        for start in range(0, len(stream.traces), a.judge_shard_size):
            stop = start + a.judge_shard_size
            shard = {
                "menu": stream.menu,
                "traces": stream.traces[start:stop],
                "questions": stream.questions[start:stop],
                "max_labels": stream.max_labels,
                "offset": start,
                "stream": s,
            }
            items.append((len(items), shard))
    results: dict[int, list[ParsedLabels]] = {}
    executor = "local" if judge is not None else a.executor
    map_shards(
        functools.partial(_make_worker, cfg.to_dict(), judge),
        items,
        lambda index, labels: results.__setitem__(index, labels),
        executor=executor,
        workers=a.workers,
        ray_address=a.ray_address,
        ray_num_cpus=a.ray_num_cpus,
        num_gpus=backend_gpus(a.judge_backend),
    )
    labels: list[list[ParsedLabels]] = [[] for _ in streams]
    for index, shard in items:
        labels[shard["stream"]].extend(results[index])
    out: dict[str, list[ParsedLabels]] = {}
    for (_, parts), got in zip(streams, labels, strict=True):
        start = 0
        for name, count in parts:
            out[name] = got[start : start + count]
            start += count
    return out
