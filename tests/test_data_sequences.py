"""Sequence-identified batches (collate_sequences): structure by hand and by property, and the
value test that per-sequence log-prob sums, and the gradients of a preference objective built
from them, agree one at a time / padded / packed on tiny random Llama and Qwen2 models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data import collate_sequences, encode_pairs, encode_ranked, packed_collate, pad_collate
from posttrain.data.tokenize import IGNORE_INDEX, EncodedExample

PAD = 99


def ex(ids, n_prompt=0):
    return EncodedExample(list(ids), [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:]))


# ---------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------


def test_collate_sequences_padded_by_hand():
    examples = [ex([1, 2, 3], 1), ex([4, 5], 1), ex([6])]
    batch = collate_sequences(examples, PAD, packing=False)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids", "sequence_ids", "num_sequences"}
    assert batch["num_sequences"] == 3 and isinstance(batch["num_sequences"], int)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, PAD], [6, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100], [6, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0], [0, 0, 0]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0], [1, 1, -1], [2, -1, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert batch["sequence_ids"].dtype == torch.long
    padded = collate_sequences(examples, PAD, packing=False, pad_to_multiple_of=4, row_length=2)  # row_length ignored
    assert padded["sequence_ids"].tolist() == [[0, 0, 0, -1], [1, 1, -1, -1], [2, -1, -1, -1]]


def test_collate_sequences_packed_by_hand():
    # Lengths 3, 2, 1, 2 into rows of 5, best-fit-decreasing: [ex0, ex1] and [ex3, ex2].
    examples = [ex([1, 2, 3], 1), ex([4, 5]), ex([6]), ex([7, 8], 1)]
    batch = collate_sequences(examples, PAD, packing=True, row_length=5)
    assert "attention_mask" not in batch and batch["num_sequences"] == 4
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 6, PAD, PAD]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1], [3, 3, 2, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 1]]
    # The first label of every document is -100 (ex1's 4, ex2's 6), and padding is -100.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 8, -100, -100, -100]]
    assert batch["num_docs"].tolist() == [2, 2] and batch["cu_seqlens"].tolist() == [0, 3, 5, 7, 8, 10]

    with pytest.raises(ValueError, match="more than row_length"):
        collate_sequences(examples, PAD, packing=True, row_length=2)
    with pytest.raises(ValueError, match="row_length"):
        collate_sequences(examples, PAD, packing=True)
    with pytest.raises(ValueError, match="at least one"):
        collate_sequences([], PAD, packing=False)
    with pytest.raises(ValueError, match="empty"):
        collate_sequences([ex([1]), EncodedExample([], [])], PAD, packing=False)


def test_pad_and_packed_collate_sequence_ids_on_request():
    examples = [ex([1, 2, 3], 1), ex([4, 5])]
    assert "sequence_ids" not in pad_collate(examples, PAD)  # unchanged by default
    padded = pad_collate(examples, PAD, return_sequence_ids=True)
    assert padded["sequence_ids"].tolist() == [[0, 0, 0], [1, 1, -1]]
    rows = [[ex([1, 2]), ex([3])], [ex([4, 5, 6])]]
    assert "sequence_ids" not in packed_collate(rows, PAD, row_length=4)
    packed = packed_collate(rows, PAD, row_length=4, return_sequence_ids=True)
    assert packed["sequence_ids"].tolist() == [[0, 0, 1, -1], [2, 2, 2, -1]]  # flattened row order


@st.composite
def sequence_batches(draw):
    examples = []
    for _ in range(draw(st.integers(1, 8))):
        n = draw(st.integers(1, 12))
        ids = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
        labels = [t if draw(st.booleans()) else IGNORE_INDEX for t in ids]
        examples.append(EncodedExample(ids, labels))
    packing = draw(st.booleans())
    row_length = max(len(e) for e in examples) + draw(st.integers(0, 10))
    return examples, packing, row_length


@settings(max_examples=150, deadline=None)
@given(case=sequence_batches())
def test_every_token_appears_once_with_its_own_id(case):
    examples, packing, row_length = case
    batch = collate_sequences(examples, PAD, packing=packing, row_length=row_length if packing else None)
    seq, ids, labels, pos = (batch[k] for k in ("sequence_ids", "input_ids", "labels", "position_ids"))
    B, T = ids.shape
    assert seq.shape == labels.shape == pos.shape == (B, T) and batch["num_sequences"] == len(examples)
    if packing:
        assert T == row_length and "attention_mask" not in batch
    else:
        assert B == len(examples) and torch.equal(batch["attention_mask"].bool(), seq >= 0)
    for s, e in enumerate(examples):
        where = (seq == s).nonzero().tolist()
        rows = {r for r, _ in where}
        cols = [c for _, c in where]
        assert len(rows) == 1 and cols == list(range(cols[0], cols[0] + len(e)))  # one contiguous run
        (r,) = rows
        span = slice(cols[0], cols[0] + len(e))
        assert ids[r, span].tolist() == e.input_ids
        assert pos[r, span].tolist() == list(range(len(e)))
        expected = ([IGNORE_INDEX] + e.labels[1:]) if packing else e.labels
        assert labels[r, span].tolist() == expected
    # -1 exactly on padding: what is left over after every example's tokens.
    pad = seq == -1
    assert int(pad.sum()) == B * T - sum(len(e) for e in examples)
    assert bool((ids[pad] == PAD).all()) and bool((labels[pad] == IGNORE_INDEX).all())
    assert int(seq.min()) >= -1 and int(seq.max()) == len(examples) - 1


# ---------------------------------------------------------------------------------------
# Values on real models: per-sequence sums and gradients, single vs padded vs packed
# ---------------------------------------------------------------------------------------

ROW = 96
USER = [{"role": "user", "content": "what is two plus three ?"}]


def asst(text):
    return [{"role": "assistant", "content": text}]


STRING_PAIRS = [
    {"prompt": "sum of 3 and 4 =", "chosen": " 7", "rejected": " 8 , the answer is 8"},
    {"prompt": "think step by step : 2 + 3 = ?", "chosen": " 2 + 3 = 5 , the answer is 5", "rejected": " 6"},
]
MESSAGE_PAIRS = [
    {"prompt": USER, "chosen": asst("five"), "rejected": asst("the answer is six")},
    {
        "prompt": [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "hello"}],
        "chosen": asst("hello world !"),
        "rejected": asst("the quick brown fox") + [{"role": "user", "content": "and then ?"}] + asst("it runs"),
    },
]
RANKED = [{"prompt": USER, "responses": ["five", "six", "it is five , the answer is 5"], "rewards": [1.0, 0.0, 0.8]}]


@pytest.fixture(scope="module")
def data_sequence_sets(data_chatml_tokenizer):
    tok = data_chatml_tokenizer
    a, _ = encode_pairs(STRING_PAIRS, tok, max_length=ROW)
    b, _ = encode_pairs(MESSAGE_PAIRS, tok, max_length=ROW)
    groups, _ = encode_ranked(RANKED, tok, max_length=ROW)
    pairs = a + b
    # The layout the trainer uses: all chosen, all rejected, then every group's responses.
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs] + [e for g in groups for e in g.responses]
    assert len({len(e) for e in examples}) > 4  # varied lengths
    return examples, len(pairs), groups[0].rewards, tok.pad_token_id, len(tok)


def make_model(kind: str, attn: str, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=vocab,
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


def sequence_sums(logits, labels, sequence_ids, num_sequences):
    """Per-sequence sums of log p(label[t+1] | ..t) over trained positions, (S,)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    seq = sequence_ids[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.zeros(num_sequences, dtype=token_logp.dtype).index_add_(0, seq[mask], token_logp[mask])


def objective(sums, num_pairs, rewards):
    """DPO-like pair term plus an exponential-tilt weighted NLL over the K-set."""
    chosen, rejected, group = sums[:num_pairs], sums[num_pairs : 2 * num_pairs], sums[2 * num_pairs :]
    weights = torch.softmax(torch.tensor(rewards) / 0.5, dim=0)
    return -F.logsigmoid(chosen - rejected).sum() - (weights * group).sum()


def run(model, sums_fn, num_pairs, rewards):
    model.zero_grad()
    sums = sums_fn()
    objective(sums, num_pairs, rewards).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums.detach(), grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sequence_sums_and_gradients_agree_single_padded_packed(data_sequence_sets, kind, attn):
    examples, num_pairs, rewards, pad_id, vocab = data_sequence_sets
    model = make_model(kind, attn, vocab)
    S = len(examples)

    def single():
        out = []
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits
            seq = torch.zeros(1, len(e), dtype=torch.long)
            out.append(sequence_sums(logits, torch.tensor([e.labels]), seq, 1))
        return torch.cat(out)

    def padded():
        batch = collate_sequences(examples, pad_id, packing=False, pad_to_multiple_of=8)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
        return sequence_sums(logits, batch["labels"], batch["sequence_ids"], batch["num_sequences"])

    packed_batch = collate_sequences(examples, pad_id, packing=True, row_length=ROW)
    assert packed_batch["input_ids"].shape[0] < S and int(packed_batch["num_docs"].max()) > 2  # really packed

    def packed():
        logits = model(
            input_ids=packed_batch["input_ids"], position_ids=packed_batch["position_ids"], use_cache=False
        ).logits
        return sequence_sums(logits, packed_batch["labels"], packed_batch["sequence_ids"], packed_batch["num_sequences"])

    ref_sums, ref_grads = run(model, single, num_pairs, rewards)
    assert ref_sums.shape == (S,) and bool((ref_sums < -1).all())  # every sequence has trained tokens
    assert len(ref_grads) > 0
    for name, fn in (("padded", padded), ("packed", packed)):
        sums, grads = run(model, fn, num_pairs, rewards)
        torch.testing.assert_close(sums, ref_sums, atol=1e-4, rtol=0, msg=name)
        assert grads.keys() == ref_grads.keys()
        for p in ref_grads:
            torch.testing.assert_close(grads[p], ref_grads[p], rtol=1e-4, atol=1e-5, msg=f"{name}: {p}")


def test_packed_sums_leak_without_the_block_diagonal_mask(data_sequence_sets):
    """Negative control: the same packed batch with plain causal positions gives other sums
    for documents that are not first in their row."""
    examples, _, _, pad_id, vocab = data_sequence_sets
    model = make_model("llama", "sdpa", vocab)
    batch = collate_sequences(examples, pad_id, packing=True, row_length=ROW)
    with torch.no_grad():
        good = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        T = batch["input_ids"].shape[1]
        bad = model(
            input_ids=batch["input_ids"], position_ids=torch.arange(T).expand_as(batch["input_ids"]), use_cache=False
        ).logits
    args = (batch["labels"], batch["sequence_ids"], batch["num_sequences"])
    a, b = sequence_sums(good, *args), sequence_sums(bad, *args)
    first = set(batch["sequence_ids"][:, 0].tolist())
    later = [s for s in range(len(examples)) if s not in first]
    assert later and all(abs(float(a[s] - b[s])) > 1e-3 for s in later)
    assert all(abs(float(a[s] - b[s])) < 1e-4 for s in first)
