"""Pure helpers of the transformers back-end: batch planning and next-token selection.

Batches are planned over token sequences sorted lexicographically, so prompts that share a
few-shot prefix are neighbours; a batch is cut only when it would exceed its row budget (decode on
CPU reads every weight once per step whatever the batch, so fuller batches are faster). Inside a
batch, :func:`prefix_groups` splits the prompts into runs that share a prefix worth prefilling
once: a run is cut where adding a prompt would halve the prefix it shares. Sampling draws each row with its own
``torch.Generator`` so a sample depends only on its seed and its own logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TOP_P_CANDIDATES = 512


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_prefix_len(token_lists: Sequence[Sequence[int]]) -> int:
    """Tokens all sequences share that can be prefilled once: every sequence keeps at least one
    token of its own, whose logits give the first sampled token."""
    if not token_lists:
        return 0
    first = token_lists[0]
    lcp = len(first)
    for tokens in token_lists[1:]:
        lcp = min(lcp, common_prefix_len(first, tokens))
    return max(0, min(lcp, min(len(t) for t in token_lists) - 1))


def plan_batches(
    token_lists: Sequence[Sequence[int]], rows: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Group unit indices into batches of at most ``batch_size`` rows (a unit larger than that is a
    batch of its own), in lexicographic order of their tokens so shared prefixes are neighbours."""
    order = sorted(range(len(token_lists)), key=lambda i: tuple(token_lists[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    current_rows = 0
    for i in order:
        if current and current_rows + rows[i] > batch_size:
            batches.append(current)
            current, current_rows = [], 0
        current.append(i)
        current_rows += rows[i]
    if current:
        batches.append(current)
    return batches


def prefix_groups(token_lists: Sequence[Sequence[int]]) -> list[range]:
    """Consecutive runs of ``token_lists`` (sorted, as a planned batch is) that share a prefix: a
    run is cut where adding the next sequence would halve the prefix the run shares."""
    groups: list[range] = []
    start, lcp = 0, None
    for i in range(1, len(token_lists)):
        common = common_prefix_len(token_lists[start], token_lists[i])
        shared = common if lcp is None else min(lcp, common)
        if lcp is not None and shared < lcp // 2:
            groups.append(range(start, i))
            start, lcp = i, None
        else:
            lcp = shared
    if token_lists:
        groups.append(range(start, len(token_lists)))
    return groups


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Zero out, per row of ``probs`` ([rows, vocab] or [vocab]), the tail outside the smallest
    set of tokens whose mass reaches ``top_p`` (a float or one value per row)."""
    squeeze = probs.dim() == 1
    probs = probs[None] if squeeze else probs
    limit = torch.as_tensor(top_p, dtype=probs.dtype, device=probs.device).reshape(-1, 1)
    if bool((limit >= 1).all()):
        return probs[0] if squeeze else probs
    # a partial sort suffices when the top candidates already hold the mass (peaked rows)
    sorted_probs, idx = torch.topk(probs, k=min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)
    if bool((sorted_probs.sum(dim=-1, keepdim=True) < limit).any()):
        sorted_probs, idx = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = torch.where((before < limit) | (limit >= 1), sorted_probs, torch.zeros_like(sorted_probs))
    out = torch.zeros_like(probs).scatter(-1, idx, sorted_probs)
    return out[0] if squeeze else out


def select_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """One next token per row of ``logits`` ([rows, vocab]): argmax where the temperature is 0,
    otherwise inverse-CDF sampling from the tempered, top-p filtered distribution with one uniform
    draw from the row's own generator (so a row's token depends only on its logits and seed)."""
    logits = logits.float()
    device = logits.device
    temps = torch.tensor(temperatures, dtype=torch.float32, device=device)
    any_greedy = any(t <= 0 for t in temperatures)
    # the argmax over the vocabulary only when some row is greedy (2.7 ms of a demo decode step)
    greedy = torch.argmax(logits, dim=-1) if any_greedy else None
    if greedy is not None and all(t <= 0 for t in temperatures):
        return greedy
    probs = torch.softmax(logits / temps.clamp(min=1e-6)[:, None], dim=-1)
    probs = top_p_filter(probs, torch.tensor(top_ps, dtype=torch.float32, device=device))
    # float64: a float32 running sum errs by about one token's mass on flat rows (cumsum(dtype=) is slow)
    cdf = probs.double().cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=g, device=device, dtype=torch.float64) for g in generators])
    picked = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)[:, 0]
    picked = picked.clamp(max=logits.shape[-1] - 1)
    return picked if greedy is None else torch.where(temps <= 0, greedy, picked)
