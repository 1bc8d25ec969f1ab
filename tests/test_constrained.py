"""Grammar-constrained judge decoding: the tiny random-weight model answers in the schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from manyways.backends import constrained
from manyways.backends.protocol import GenRequest
from manyways.composition import judge_schema, judge_token_budget, parse_labels
from manyways.heuristics import load_taxonomy


def test_enum_list_shape_and_longest_answer() -> None:
    schema = judge_schema(["a", "bbb", "cc"])
    assert constrained.enum_list_shape(schema) == (["a", "bbb", "cc"], 1, 3)
    assert constrained.longest_answer(schema) == '["bbb", "cc", "a"]'
    assert constrained.enum_list_shape({"type": "object"}) is None
    no_unique = {**schema, "uniqueItems": False}
    assert constrained.enum_list_shape(no_unique) is None
    with pytest.raises(ValueError):
        constrained.longest_answer({"type": "string"})


def test_judge_budget_comes_from_the_schema() -> None:
    taxonomy = load_taxonomy()
    schema = judge_schema(taxonomy.ids)
    longest = constrained.longest_answer(schema)
    assert json.loads(longest) and len(json.loads(longest)) == 8
    assert judge_token_budget(schema) == len(longest) + 2  # one ASCII char <= one token, plus EOS
    assert judge_token_budget(judge_schema(["x"])) < judge_token_budget(schema)


def test_ordered_subset_grammar_rules() -> None:
    lark = constrained.ordered_subset_lark(["a", "b", "c"], 1, 2)
    assert lark.startswith('start: "["')
    assert 't_0_1: "]" | ", " "\\"b\\"" t_1_2' in lark  # after a: close, or a later item
    assert 't_2_1: "]"' in lark  # nothing after the last choice
    with pytest.raises(ValueError):
        constrained.ordered_subset_lark(["a"], 0, 1)


@pytest.mark.slow
def test_tiny_random_model_always_answers_in_the_schema(tiny_model_dir: Path) -> None:
    from manyways.backends.hf import HFBackend
    from manyways.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32", device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a spread that makes random text likely, as in test_backend_hf
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    backend = HFBackend(model, tokenizer, model_id="tiny", batch_size=8)
    taxonomy = load_taxonomy()
    schema = judge_schema(taxonomy.ids)
    budget = judge_token_budget(schema)
    msgs = [{"role": "user", "content": "Label this solution: 2 + 3 = 5."}]
    requests = [
        GenRequest("greedy", msgs, (0,), budget, 0.0, json_schema=schema),
        GenRequest("hot", msgs, tuple(range(1, 7)), budget, 1.5, json_schema=schema),
        GenRequest("free", msgs, (9,), 12, 1.0),  # an unconstrained row in the same batch
    ]
    out = backend.generate(requests)
    answers = [s for samples in out[:2] for s in samples]
    assert len(answers) == 7
    for sample in answers:
        parsed = parse_labels(sample.text, taxonomy.ids)
        assert parsed.ok, (sample.text, parsed.error)
        assert sample.finish_reason == "stop"
    unconstrained = out[2][0].text
    assert parse_labels(unconstrained, taxonomy.ids).error is not None  # random weights: no JSON


def test_each_sample_gets_its_own_matcher_from_one_compilation(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schema's grammar is compiled once per tokenizer; every matcher handed out starts at the
    beginning and advancing one does not advance another."""
    import llguidance

    from manyways.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    compiled: list[str] = []

    class CountingMatcher:  # llguidance.LLMatcher, counting compilations (constructor calls)
        def __call__(self, tok, grammar):  # type: ignore[no-untyped-def]
            compiled.append(grammar)
            return real(tok, grammar)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(real, name)

    real = llguidance.LLMatcher
    monkeypatch.setattr(llguidance, "LLMatcher", CountingMatcher())
    c = constrained.SchemaConstraint(tokenizer, {tokenizer.eos_token_id}, len(tokenizer))
    schema = judge_schema(load_taxonomy().ids)
    first, second = c.matcher(schema), c.matcher(schema)
    assert len(compiled) == 1
    for token in tokenizer.encode('["decompose"]', add_special_tokens=False):
        c.advance(first, token)
    assert first.is_accepting() and not second.is_accepting()
    opening = tokenizer.encode("[", add_special_tokens=False)[0]
    assert second.consume_token(opening)  # still at the start of an answer
    assert not c.matcher(schema).is_accepting() and len(compiled) == 1
