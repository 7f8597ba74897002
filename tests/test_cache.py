"""The tokenization cache: hits give the same examples; a changed file, tokenizer or setting
misses; a corrupt entry is rebuilt with a message; worker processes give the same result."""

from __future__ import annotations

import copy
import json

import pytest

from posttrain.algorithms.sft import SFTConfig, encode_sft_source
from posttrain.config import load_config
from posttrain.data import cache as cache_mod
from posttrain.data import tokenize as tok_mod
from posttrain.data.formats import load_records
from posttrain.world.datasets import sft_record
from posttrain.world.tasks import generate_problems

from .tiny import world_tokenizer


def _write(path, n, seed=0):
    path.write_text("".join(json.dumps(sft_record(p)) + "\n" for p in generate_problems(n, seed=seed)))
    return path


def _encode(path, tokenizer, tmp_path, logs, **data):
    cfg = load_config(SFTConfig, None, [f"data.cache_dir={tmp_path / 'cache'}"] + [f"data.{k}={v}" for k, v in data.items()])
    kw = dict(max_length=cfg.data.max_length, overlong=cfg.data.overlong, loss_on=cfg.data.loss_on)
    return encode_sft_source(str(path), cfg.data, 0, tokenizer, kw, log=logs.append)


def _same(a, b):
    return [(e.input_ids, e.labels, e.truncated) for e in a] == [(e.input_ids, e.labels, e.truncated) for e in b]


def test_a_second_encode_comes_from_the_cache_and_changes_miss(tmp_path):
    tok, logs = world_tokenizer(), []
    f = _write(tmp_path / "d.jsonl", 30)
    first, rep1, hit1 = _encode(f, tok, tmp_path, logs)
    again, rep2, hit2 = _encode(f, tok, tmp_path, logs)
    assert (hit1, hit2) == (False, True)
    assert _same(first, again) and rep1 == rep2
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / "examples.safetensors").is_file()
    assert json.loads((entries[0] / "key.json").read_text())["max_length"] == 512
    # a changed setting, file content or tokenizer misses
    assert _encode(f, tok, tmp_path, logs, max_length=64)[2] is False
    _write(f, 30, seed=1)
    changed, _, hit = _encode(f, tok, tmp_path, logs)
    assert hit is False and not _same(changed, first)
    other = copy.deepcopy(world_tokenizer())   # world_tokenizer() is shared: never modify it
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert _encode(f, other, tmp_path, logs)[2] is False
    assert _encode(f, tok, tmp_path, logs, cache="false")[2] is False
    assert len(list((tmp_path / "cache").iterdir())) == 4   # no entry written with the cache off


def test_a_corrupt_entry_is_reported_deleted_and_rebuilt(tmp_path):
    tok, logs = world_tokenizer(), []
    f = _write(tmp_path / "d.jsonl", 10)
    first, _, _ = _encode(f, tok, tmp_path, logs)
    (entry,) = list((tmp_path / "cache").iterdir())
    # replaced, not rewritten in place: `first` reads the entry's file through a memory map, and
    # truncating a mapped file under a running process is a SIGBUS (the cache itself only ever
    # renames complete entries into place)
    (entry / "garbage").write_bytes(b"garbage")
    (entry / "garbage").replace(entry / "examples.safetensors")
    rebuilt, _, hit = _encode(f, tok, tmp_path, logs)
    assert hit is False and _same(first, rebuilt)
    assert any("unreadable" in line and "tokenizing again" in line for line in logs)
    assert _encode(f, tok, tmp_path, logs)[2] is True
    # an entry whose arrays disagree with its report is unreadable too
    rep = json.loads((entry / "report.json").read_text())
    (entry / "report.json").write_text(json.dumps({**rep, "kept": rep["kept"] + 1}))
    with pytest.raises(ValueError, match="report says"):
        cache_mod.load_entry(entry)


def test_worker_processes_give_the_same_examples(tmp_path, monkeypatch):
    monkeypatch.setattr(tok_mod, "WORKER_CHUNK", 40)
    tok = world_tokenizer()
    ds = load_records(_write(tmp_path / "d.jsonl", 130))
    one, rep1 = tok_mod.encode_dataset(ds, tok, max_length=73, overlong="drop")
    two, rep2 = tok_mod.encode_dataset(ds, tok, max_length=73, overlong="drop", num_proc=2)
    assert _same(one, two) and rep1 == rep2 and rep1.dropped_overlong > 0


def test_sft_logs_the_cache_hit(tmp_path, model_dirs, capsys):
    from posttrain.cli import main

    f = _write(tmp_path / "d.jsonl", 12)
    args = ["sft", f"model.name_or_path={model_dirs['llama']}", f"data.train={f}", "data.eval=null",
            f"data.cache_dir={tmp_path / 'c'}", "train.max_steps=3", "train.micro_batch_size=2", "train.progress=false"]
    assert main(args + [f"train.output_dir={tmp_path / 'a'}"]) == 0
    assert "from the tokenization cache" not in capsys.readouterr().out
    assert main(args + [f"train.output_dir={tmp_path / 'b'}"]) == 0
    assert "kept 12 (0 truncated to max_length=512), dropped 0 over-long (policy 'truncate') and 0 with no " \
           "trainable token left (from the tokenization cache)" in capsys.readouterr().out
    # the run on the cached examples (read lazily from the entry's arrays) trains exactly like the first
    def losses(run):
        return [json.loads(ln)["loss"] for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in ln]
    assert losses("b") == losses("a") and len(losses("a")) == 3


def test_cached_examples_are_read_lazily_and_index_like_a_list(tmp_path):
    tok, logs = world_tokenizer(), []
    f = _write(tmp_path / "d.jsonl", 10)
    first, _, _ = _encode(f, tok, tmp_path, logs)
    cached, _, hit = _encode(f, tok, tmp_path, logs)
    assert hit and isinstance(cached, cache_mod.CachedExamples) and len(cached) == len(first) == 10
    assert _same(cached[2:5], first[2:5]) and _same([cached[-1]], [first[-1]])
    with pytest.raises(IndexError):
        cached[10]


@pytest.mark.parametrize("kind,make", [
    ("paired", "preference_records"),
    ("unpaired", "unpaired_records"),
    ("ranked", "ranked_records"),
])
def test_preference_units_round_trip_through_the_cache(tmp_path, kind, make):
    """Pairs (with margins), KTO examples (label + KL partner) and ranked K-sets (rewards) come
    back from the cache exactly as encoded; a changed file or max_length misses."""
    from posttrain.algorithms.dpo import DPOConfig, encode_sources
    from posttrain.world import preferences as wp

    records = getattr(wp, make)(12, seed=0)
    if kind == "paired":
        for i, r in enumerate(records):
            r["margin"] = float(i) / 4
    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = world_tokenizer()

    def run(*extra):
        logs = []
        cfg = load_config(DPOConfig, None, [f"data.train={f}", "data.eval=null", f"data.cache_dir={tmp_path / 'c'}",
                                            *extra])
        units, _, summary = encode_sources(cfg.data, tok, kind, seed=0, log=logs.append, needed_by="test")
        return units, summary, logs

    def key(units):
        return [([(e.input_ids, e.labels, e.truncated) for e in u.sequences],
                 [(e.input_ids, e.labels, e.truncated) for e in u.kl_sequences], u.desirable, u.rewards, u.margin)
                for u in units]

    first, s1, logs1 = run()
    again, s2, logs2 = run()
    assert "from the tokenization cache" not in logs1[0] and "from the tokenization cache" in logs2[0]
    assert key(again) == key(first) and s2 == s1 and len(first) > 0
    if kind == "unpaired":
        assert all(u.kl_sequences and u.desirable in (True, False) for u in again)
    if kind == "ranked":
        assert all(len(u.rewards) == len(u.sequences) >= 2 for u in again)
    if kind == "paired":
        assert [u.margin for u in again] == [u.margin for u in first] and again[1].margin == 0.25
    _, _, logs3 = run("data.max_length=64")
    assert "from the tokenization cache" not in logs3[0]
    f.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))
    shorter, _, logs4 = run()
    assert "from the tokenization cache" not in logs4[0] and len(shorter) == len(first) - 1


def test_the_first_pass_is_streamed_into_the_entry_and_equals_the_in_memory_encoding(tmp_path, monkeypatch):
    """A cache miss on a file writes the entry as the records stream by (no record list: the
    in-memory loader is never called), through worker processes and buffer flushes; the examples
    and report equal encode_dataset's on the same file, and the tensors equal save_entry's."""
    from safetensors.torch import load_file

    import posttrain.algorithms.sft as sft_mod

    monkeypatch.setattr(tok_mod, "WORKER_CHUNK", 40)
    monkeypatch.setattr(cache_mod.EntryWriter, "FLUSH", 50)
    monkeypatch.setattr(sft_mod, "load_sft_source", lambda *a, **k: pytest.fail("the first pass loaded every record"))
    tok, logs = world_tokenizer(), []
    f = _write(tmp_path / "d.jsonl", 130)
    ref, ref_report = tok_mod.encode_dataset(load_records(f), tok, max_length=73, overlong="drop")
    for num_proc in (1, 2):
        cache = tmp_path / f"c{num_proc}"
        cfg = load_config(SFTConfig, None, [f"data.cache_dir={cache}", f"data.num_proc={num_proc}"])
        kw = dict(max_length=73, overlong="drop", loss_on="response")
        got, report, hit = encode_sft_source(str(f), cfg.data, 0, tok, kw, log=logs.append)
        assert hit is False and isinstance(got, cache_mod.CachedExamples)
        assert _same(got, ref) and report == ref_report and 0 < report.dropped_overlong < 130
        (entry,) = list(cache.iterdir())   # complete, no temporary left
        streamed = load_file(str(entry / "examples.safetensors"))
        cache_mod.save_entry(tmp_path / f"eager{num_proc}", ref, ref_report, {})
        eager = load_file(str(tmp_path / f"eager{num_proc}" / "examples.safetensors"))
        assert streamed.keys() == eager.keys()
        for name in eager:
            assert streamed[name].dtype == eager[name].dtype and streamed[name].equal(eager[name]), name
        assert encode_sft_source(str(f), cfg.data, 0, tok, kw, log=logs.append)[2] is True


def test_a_bad_record_in_the_stream_names_its_line_and_leaves_no_entry(tmp_path):
    from posttrain.errors import ConfigError, DataError

    tok, logs = world_tokenizer(), []
    f = _write(tmp_path / "d.jsonl", 20)
    lines = f.read_text().splitlines()
    lines[13] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl, line 14.*role"):
        _encode(f, tok, tmp_path, logs)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    with pytest.raises(ConfigError, match="holds preference records"):
        _encode(pairs, tok, tmp_path, logs)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        _encode(empty, tok, tmp_path, logs)
    assert not list((tmp_path / "cache").iterdir())
