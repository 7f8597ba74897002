"""Prefix-shared batches give exactly the per-sequence log-probs (and gradients) of the ordinary layout."""

import pytest
import torch

from posttrain.algorithms.sequences import collate_examples, collate_groups, sequence_log_probs
from posttrain.data import EncodedExample, collate_shared_prefix, load_records, prediction_index
from posttrain.data.preference import encode_pairs, encode_ranked
from posttrain.world.preferences import preference_records, ranked_records

from .tiny import tiny_model, world_tokenizer


def _groups(kind, n, seed=0):
    tok = world_tokenizer()
    if kind == "pairs":
        pairs, _ = encode_pairs(load_records(preference_records(n, seed=seed)), tok, max_length=128)
        return [[p.chosen, p.rejected] for p in pairs]
    groups, _ = encode_ranked(load_records(ranked_records(n, k=3, seed=seed)), tok, max_length=128)
    return [list(g.responses) for g in groups]


def test_prediction_index_hand_example():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    seq = torch.tensor([[0, 0, 0, -1], [1, 1, 2, 2]])  # row 1 packs two sequences
    idx = prediction_index(labels, seq)
    # (0,1) and (0,2) predicted from rows 0 and 1; (1,2) is the first token of sequence 2: not a target
    assert idx["lp_rows"].tolist() == [0, 1, 6]
    assert idx["lp_targets"].tolist() == [5, 6, 8]
    assert idx["lp_seq"].tolist() == [0, 0, 2]


def test_shared_prefix_layout_by_hand():
    a = EncodedExample([1, 2, 3, 10, 11], [-100, -100, -100, 10, 11])
    b = EncodedExample([1, 2, 3, 20], [-100, -100, -100, 20])
    batch = collate_shared_prefix([[a, b]], [[0, 1]], 0, row_length=16)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 20]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]
    m = batch["attention_mask"][0, 0].int().tolist()
    assert m[5] == [1, 1, 1, 0, 0, 1]  # the second response sees the prompt and itself, not the first response
    assert m[4] == [1, 1, 1, 1, 1, 0]
    # targets: 10 from row 2, 11 from row 3, 20 from row 2 (the shared last prompt token)
    assert batch["lp_rows"].tolist() == [2, 3, 2]
    assert batch["lp_targets"].tolist() == [10, 11, 20]
    assert batch["lp_seq"].tolist() == [0, 0, 1]
    assert batch["num_computed_tokens"] == 6 and batch["num_input_tokens"] == 9


def test_common_prefix_keeps_a_token_for_every_response():
    a = EncodedExample([1, 2, 3], [-100, 2, 3])
    b = EncodedExample([1, 2, 3, 4], [-100, 2, 3, 4])  # a is a prefix of b
    batch = collate_shared_prefix([[a, b]], [[0, 1]], 0, row_length=16)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 3, 4]]
    assert batch["lp_seq"].tolist() == [0, 0, 1, 1, 1]
    assert batch["lp_targets"].tolist() == [2, 3, 2, 3, 4]


@pytest.mark.parametrize("arch, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
@pytest.mark.parametrize("kind", ["pairs", "ranked"])
def test_shared_prefix_equals_ordinary_layout(arch, attn, kind):
    tok = world_tokenizer()
    model = tiny_model(arch, seed=5, hidden=48, attn=attn)
    groups = _groups(kind, 5, seed=2)
    ids, start = [], 0
    for g in groups:
        ids.append(list(range(start, start + len(g))))
        start += len(g)
    results = {}
    for share in (True, False):
        batch = collate_groups(groups, ids, pad_token_id=tok.pad_token_id, packing=True, row_length=160,
                               share_prefix=share, attn_implementation=attn)
        if share:
            assert batch["num_computed_tokens"] < batch["num_input_tokens"]
            assert batch["attention_mask"].dim() == 4 and batch["input_ids"].shape[0] >= 2  # several docs per row
        model.zero_grad()
        out = sequence_log_probs(model, batch)
        (out["logps"] * torch.linspace(0.5, 1.5, len(out["logps"]))).sum().backward()
        results[share] = (out["logps"].detach(), out["lengths"], [p.grad.clone() for p in model.parameters()])
    # the ordinary layout, one sequence at a time
    flat = [e for g in groups for e in g]
    single = torch.cat([sequence_log_probs(model, collate_examples([e], pad_token_id=tok.pad_token_id,
                                                                   packing=False, row_length=160))["logps"]
                        for e in flat]).detach()
    torch.testing.assert_close(results[True][0], single, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(results[False][0], single, rtol=1e-5, atol=1e-4)
    assert torch.equal(results[True][1], results[False][1])
    for a, b in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
