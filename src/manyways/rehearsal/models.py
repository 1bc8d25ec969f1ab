"""Tiny local stand-ins for the Hub models a config names, random weights, same families.

- a chat causal LM of the Llama family whose chat template starts with the BOS token and whose
  tokenizer adds a BOS when it encodes text (Llama 3's two properties that the double-BOS defect
  hinges on), saved in the dtype the config asks for (bfloat16 in the paper's recipe);
- a Qwen2-family chat LM (ChatML, no BOS) for a teacher such as Qwen/QwQ-32B;
- a Llama-family sequence-classification reward model (one logit) like Skywork-Reward-V2-Llama.

The tokenizer is a 2,048-token byte-level BPE fitted on the heuristic catalogues (so any text
round-trips and the lm-head stays cheap on a CPU), with Llama 3's or ChatML's chat tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from manyways.models import _build_atomically, is_complete

log = logging.getLogger(__name__)

BOS = "<|begin_of_text|>"
LLAMA3_SPECIAL = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
FAMILIES = ("llama_chat", "qwen2_chat", "llama_reward")


SPECIALS = [BOS, *LLAMA3_SPECIAL, "<|im_start|>", "<|im_end|>"]
VOCAB = 2048


def _corpus() -> list[str]:
    """Text to fit the stand-ins' byte-level BPE on: the heuristic catalogues (the prompts' bulk)
    and the rehearsal's questions and answers."""
    from manyways.rehearsal.data import WRITERS

    roots = [
        Path.cwd() / "configs" / "heuristics",
        Path(__file__).resolve().parents[3] / "configs" / "heuristics",
    ]
    texts = [p.read_text() for root in roots if root.is_dir() for p in sorted(root.glob("*.yaml"))]
    texts += [repr(make(i)) for make in WRITERS.values() for i in range(24)]
    return [*texts, *TAUGHT_COMPLETIONS]


def _tokenizer(family: str) -> Any:
    """A small byte-level BPE (VOCAB ids: any text round-trips; a small vocabulary keeps the
    lm-head cheap on a CPU) with Llama 3's chat tokens, or ChatML's for the Qwen family."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    if family == "qwen2_chat":
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>")
        tok.chat_template = CHATML_TEMPLATE
        return tok
    # like Llama 3's tokenizer: encoding text with special tokens prepends <|begin_of_text|>
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A:0", pair=f"{BOS} $A:0 $B:1", special_tokens=[(BOS, SPECIALS.index(BOS))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token="<|eot_id|>", pad_token="<|eot_id|>"
    )
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def _model(family: str, tok: Any, dtype: str, seed: int, teach: bool = True) -> Any:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from manyways.models import tiny_shape

    shape = tiny_shape(tok)
    torch.manual_seed(seed)
    if family == "qwen2_chat":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    elif family == "llama_reward":
        model = LlamaForSequenceClassification(LlamaConfig(**shape, num_labels=1))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    if teach and family != "llama_reward":
        _teach(model, tok, seed=seed)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    return model


TAUGHT_COMPLETIONS = ("Adding them up gives \\boxed{7}.", "Adding them up gives \\boxed{8}.")


def _teach(model: Any, tok: Any, steps: int = 120, seed: int = 0) -> None:
    """Teach a random chat LM to answer any prompt with one of :data:`TAUGHT_COMPLETIONS` (the
    first three times in four) then stop.

    Random weights never box a right answer, so select would have nothing to keep and RL no
    reward signal; this short fit (about a minute on one core) gives the stand-in correct traces
    for the questions whose gold is 7 and incorrect ones for the rest."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    targets = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TAUGHT_COMPLETIONS]
    if len({len(t) for t in targets}) != 1:
        raise ValueError("the taught completions must have equal token lengths")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = []
        for _ in range(4):
            n = int(torch.randint(3, 300, (1,), generator=gen))
            words = torch.randint(len(SPECIALS), len(tok), (n,), generator=gen).tolist()
            user = tok.decode(words)
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(prompt, add_special_tokens=False)["input_ids"][-300:]
            batch.append(ids + targets[len(batch) == 3])
        width = max(len(b) for b in batch)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        keep = len(targets[0]) + 1  # logits of the positions that predict the completion only
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[:, :-1]
        labels_t = torch.tensor([targets[i == 3] for i in range(len(batch))])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels_t.reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    log.info("taught the stand-in to box 7 (final loss %.3f)", float(loss.detach()))


def build_stand_in(
    family: str, out_dir: Path, *, dtype: str = "bfloat16", seed: int = 0, teach: bool = True
) -> Path:
    """Build (once; cached by directory) a tiny random-weight model of ``family`` in ``out_dir``;
    chat models are then taught to box an answer (:func:`_teach`) unless ``teach`` is False."""
    if family not in FAMILIES:
        raise ValueError(f"unknown stand-in family {family!r}: use one of {FAMILIES}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"stand-in dtype {dtype!r}: use float32 or bfloat16")
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir

    def build(tmp: Path) -> None:
        tok = _tokenizer(family)
        _model(family, tok, dtype, seed, teach).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    log.info("building a tiny %s stand-in (%s) in %s", family, dtype, out_dir)
    return _build_atomically(out_dir, build, f"rehearsal-{family}-{dtype}-{seed}")


def family_for(hub_id: str, role: str) -> str:
    """The stand-in family of a Hub model: a reward model, a Qwen chat model, else Llama chat."""
    if role == "reward_model":
        return "llama_reward"
    return "qwen2_chat" if any(k in hub_id.lower() for k in ("qwen", "qwq")) else "llama_chat"
