"""The one log-prob path: fused head == logits path; note 004's get_response_log_probs contract."""

import pytest
import torch

from posttrain.data import packed_collate, pad_collate, tokenize_prompt_and_output
from posttrain.models.logprobs import (
    fused_head,
    get_response_log_probs,
    shift_labels,
    token_log_probs_from_model,
)

from .tiny import sft_examples, tiny_model, world_tokenizer


def test_shift_labels():
    labels = torch.tensor([[-100, 5, 6, -100], [1, 2, 3, 4]])
    assert shift_labels(labels).tolist() == [[5, 6, -100, -100], [2, 3, 4, -100]]


@pytest.mark.parametrize("arch, tie", [("llama", True), ("qwen2", False)])
def test_fused_equals_logits_path_values_and_grads(arch, tie):
    model = tiny_model(arch, tie=tie, seed=3)
    assert fused_head(model) is not None
    batch = pad_collate(sft_examples(6, seed=1), world_tokenizer().pad_token_id)
    targets = shift_labels(batch["labels"])
    results = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        out = token_log_probs_from_model(model, batch["input_ids"], targets,
                                         attention_mask=batch["attention_mask"], return_entropy=True,
                                         fused=fused, chunk_size=7)
        mask = (targets != -100).float()
        (-(out["log_probs"] * mask).sum() + 0.1 * (out["entropy"] * mask).sum()).backward()
        results[fused] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (a, ga), (b, gb) = results[True], results[False]
    torch.testing.assert_close(a["log_probs"], b["log_probs"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["entropy"], b["entropy"], rtol=1e-5, atol=1e-5)
    assert (a["log_probs"][targets == -100] == 0).all()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6)
    # against a plain log_softmax over the model's own logits
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = targets != -100
    torch.testing.assert_close(a["log_probs"][mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_packed_padded_and_single_agree_through_model_path():
    model = tiny_model("qwen2", seed=4)
    model.eval()
    examples = sft_examples(5, seed=2)
    tok = world_tokenizer()

    def per_doc(batch, fused=True):
        targets = shift_labels(batch["labels"])
        out = token_log_probs_from_model(model, batch["input_ids"], targets,
                                         attention_mask=batch.get("attention_mask"),
                                         position_ids=batch.get("position_ids"), fused=fused)
        return out["log_probs"][targets != -100]

    single = torch.cat([per_doc(pad_collate([e], tok.pad_token_id)) for e in examples])
    padded = per_doc(pad_collate(examples, tok.pad_token_id))
    packed = per_doc(packed_collate([examples[:3], examples[3:]], tok.pad_token_id, row_length=256))
    torch.testing.assert_close(padded, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-5)


def test_get_response_log_probs_contract():
    tok = world_tokenizer()
    model = tiny_model("llama", seed=5)
    batch = tokenize_prompt_and_output(["Mia has 3 apples.", "Tom"], ["3 + 4 = 7", "#### 2"], tok)
    out = get_response_log_probs(model, batch["input_ids"], batch["labels"], return_token_entropy=True)
    assert set(out) == {"log_probs", "token_entropy"}
    assert out["log_probs"].shape == batch["input_ids"].shape == out["token_entropy"].shape
    logits = model(input_ids=batch["input_ids"]).logits
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out["log_probs"], logp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["token_entropy"], -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
    assert out["log_probs"].requires_grad
    assert set(get_response_log_probs(model, batch["input_ids"], batch["labels"])) == {"log_probs"}
