"""The rehearsal: a GPU recipe's experiment run on a CPU, every setting kept but what cannot exist.

``manyways experiment configs/paper_llama3b.yaml --rehearse`` runs every arm of the config with:

- the substitutions of :mod:`manyways.rehearsal.substitute` (the ONE place they are made): Hub
  models -> tiny local models of the same family (:mod:`.models`), Hub datasets -> small local
  files shaped like their rows (:mod:`.data`), question counts / generation lengths / evaluation
  samples divided by :class:`~manyways.rehearsal.substitute.Scale`, Ray workers capped at the fake
  GPUs, TRL's vLLM rollouts and wandb off;
- the real code paths (:mod:`.run`): the vllm back-end on a vLLM engine stand-in
  (:mod:`.engine`, on the hf back-end's decode loop, refusing what vLLM refuses), the Ray executor
  on a local cluster with declared fake GPUs, midtrain and rl under
  ``accelerate launch --num_processes 2 --cpu`` (:mod:`.launch`), evaluation and analysis;
- a printed table of what ran per arm and stage, and the real run's projection.
"""

from manyways.rehearsal.substitute import Scale, rehearsal_config

__all__ = ["Scale", "rehearsal_config", "rehearse"]


def rehearse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 (see manyways.rehearsal.run.rehearse)
    from manyways.rehearsal.run import rehearse as _rehearse

    return _rehearse(*args, **kwargs)
