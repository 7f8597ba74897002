"""Value-level check that packing is exact on real Hugging Face models.

The same documents are scored (a) one at a time, (b) right-padded with an attention mask,
and (c) packed with restarting position ids and no attention mask. Per-token log-probs,
the token-mean loss and the parameter gradients must agree to fp32 tolerance, for tiny
random Llama and Qwen2 models under the sdpa and eager attention backends. Negative
controls show that the block-diagonal mask is what makes (c) right.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.data.collate import packed_collate, pad_collate
from posttrain.data.formats import load_records
from posttrain.data.packing import best_fit_decreasing
from posttrain.data.tokenize import IGNORE_INDEX, encode_dataset

ROW = 96

RECORDS = [
    {"messages": [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four"}]},
    {
        "messages": [
            {"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": "the quick brown fox jumps over the lazy dog ?"},
            {"role": "assistant", "content": "the dog is lazy , the fox is quick"},
            {"role": "user", "content": "and then ?"},
            {"role": "assistant", "content": "it runs"},
        ]
    },
    {"prompt": "sum of 3 and 4 =", "completion": " 7"},
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world !"}]},
    {"prompt": "think step by step : 2 + 3 = ?", "completion": " 2 + 3 = 5 , the answer is 5"},
    {"messages": [{"role": "user", "content": "one two three four"}, {"role": "assistant", "content": "five six"}]},
]


def make_model(kind: str, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=400,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,  # sharper attention than the default, so leaks would show
    )
    config._attn_implementation = attn
    return model_cls(config).float()


@pytest.fixture(scope="module")
def data_examples(data_chatml_tokenizer):
    tok = data_chatml_tokenizer
    conv = [r for r in RECORDS if "messages" in r]
    pc = [r for r in RECORDS if "prompt" in r]
    a, _ = encode_dataset(load_records(conv), tok, max_length=ROW)
    b, _ = encode_dataset(load_records(pc), tok, max_length=ROW)
    examples = a + b
    assert len({len(e) for e in examples}) > 3  # varied lengths
    return examples, tok.pad_token_id


def shifted_logps(logits: torch.Tensor, labels: torch.Tensor):
    """Per-position log p(label[t+1] | ..t) and the mask of trained positions, (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    return logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1), mask


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_single(model, examples):
    model.zero_grad()
    per_doc, total, count = [], 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor([ex.labels])
        lp, mask = shifted_logps(model(input_ids=ids, use_cache=False).logits, labels)
        per_doc.append(lp[mask])
        total = total + lp[mask].sum()
        count += int(mask.sum())
    loss = -total / count
    loss.backward()
    return [d.detach() for d in per_doc], loss.detach(), grads(model)


def run_padded(model, examples, pad_id):
    model.zero_grad()
    batch = pad_collate(examples, pad_id, pad_to_multiple_of=8)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits
    lp, mask = shifted_logps(logits, batch["labels"])
    loss = -lp[mask].sum() / mask.sum()
    loss.backward()
    return [lp[b][mask[b]].detach() for b in range(len(examples))], loss.detach(), grads(model)


def packed_batch(examples, pad_id):
    bins = best_fit_decreasing([len(e) for e in examples], ROW)
    assert len(bins) < len(examples)  # something is actually packed together
    return bins, packed_collate([[examples[i] for i in b] for b in bins], pad_id, row_length=ROW)


def per_doc_from_rows(lp, mask, bins, examples):
    out = [None] * len(examples)
    for r, b in enumerate(bins):
        p = 0
        for i in b:
            n = len(examples[i])
            # Positions p..p+n-2 predict the document's tokens 1..n-1.
            out[i] = lp[r, p : p + n - 1][mask[r, p : p + n - 1]]
            p += n
    return out


def run_packed(model, examples, pad_id, **overrides):
    model.zero_grad()
    bins, batch = packed_batch(examples, pad_id)
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    kwargs.update(overrides)
    lp, mask = shifted_logps(model(**kwargs).logits, batch["labels"])
    loss = -lp[mask].sum() / mask.sum()
    loss.backward()
    return per_doc_from_rows(lp.detach(), mask, bins, examples), loss.detach(), grads(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_single_padded_and_packed_agree(data_examples, kind, attn):
    examples, pad_id = data_examples
    model = make_model(kind, attn)
    single = run_single(model, examples)
    padded = run_padded(model, examples, pad_id)
    packed = run_packed(model, examples, pad_id)
    for other in (padded, packed):
        for a, b in zip(single[0], other[0]):
            assert a.shape == b.shape and a.numel() > 0
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other[1], single[1], atol=1e-5, rtol=0)
        assert single[2].keys() == other[2].keys() and len(single[2]) > 0
        for name in single[2]:
            torch.testing.assert_close(other[2][name], single[2][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_negative_controls_documents_leak_without_the_block_diagonal_mask(data_examples, attn):
    examples, pad_id = data_examples
    model = make_model("llama", attn)
    bins, batch = packed_batch(examples, pad_id)
    second = [b[1] for b in bins if len(b) > 1]  # documents that are not first in their row
    assert second
    single, _, _ = run_single(model, examples)
    good = run_packed(model, examples, pad_id)[0]
    T = batch["input_ids"].shape[1]
    controls = {
        # Plain causal attention with positions 0..T-1: the second document sees the first.
        "no position restarts": {"position_ids": torch.arange(T).expand_as(batch["input_ids"])},
        # Restarting positions but an explicit all-ones mask: transformers then skips the
        # packed-sequence detection, so only the mask differs from the correct call.
        "all-ones attention_mask": {"attention_mask": torch.ones_like(batch["input_ids"])},
        # With a KV cache (config.use_cache defaults to True, even in train mode) transformers
        # also skips the detection: trainers must pass use_cache=False with packed batches.
        "use_cache=True": {"use_cache": True},
    }
    for name, override in controls.items():
        leaked = run_packed(model, examples, pad_id, **override)[0]
        for i in second:
            torch.testing.assert_close(good[i], single[i], atol=1e-5, rtol=1e-5)
            diff = (leaked[i] - single[i]).abs().max().item()
            assert diff > 1e-3, f"{name}: document {i} unaffected ({diff})"
