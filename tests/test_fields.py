"""Field mapping (public data sets in their own layout) and dataset directories / Arrow shards."""

from __future__ import annotations

import json

import pytest

from posttrain.config import load_config
from posttrain.data.fields import PRESETS, map_record, resolve_fields
from posttrain.data.formats import load_records
from posttrain.errors import ConfigError, DataError

GSM8K = [
    {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "Weng earns $12 an hour. How much for 50 minutes?", "answer": "12/60*50 = 10\n#### 10"},
]
ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well. 2. Move. 3. Sleep."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_gsm8k_loads_as_rl_prompts_with_the_final_answer_and_as_sft_pairs(tmp_path):
    f = _write(tmp_path / "gsm8k.jsonl", GSM8K)
    rl = load_records(f, fields="gsm8k")
    assert rl.format == "prompt_answer"
    assert [r["answer"] for r in rl.records] == ["72", "10"]
    assert rl.records[0]["prompt"] == GSM8K[0]["question"] and "question" not in rl.records[0]
    sft = load_records(f, fields="gsm8k-sft")
    assert sft.format == "prompt_completion" and sft.records[1]["completion"] == GSM8K[1]["answer"]


def test_alpaca_template_drops_an_empty_input_and_keeps_other_fields(tmp_path):
    recs = [dict(r, id=i) for i, r in enumerate(ALPACA)]
    ds = load_records(_write(tmp_path / "alpaca.jsonl", recs), fields="alpaca")
    assert ds.records[0]["prompt"] == "Give three tips for staying healthy."
    assert ds.records[1]["prompt"] == "Translate to French.\n\nGood morning"
    assert ds.records[1]["completion"] == "Bonjour" and ds.records[1]["id"] == 1
    assert not {"instruction", "input", "output"} & set(ds.records[0])


def test_renamed_preference_sides_and_nested_fields():
    recs = [{"question": "2+2?", "response_j": "4", "response_k": "5", "meta": {"src": "x"}}]
    ds = load_records(recs, fields={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    assert ds.format == "preference" and (ds.records[0]["chosen"], ds.records[0]["rejected"]) == ("4", "5")
    nested = [{"q": {"text": "hi"}, "a": {"text": "hello"}}]
    ds = load_records(nested, fields={"prompt": "q.text", "completion": "a.text"})
    assert (ds.records[0]["prompt"], ds.records[0]["completion"]) == ("hi", "hello")
    ds = load_records([{"q": "x", "sol": "think\nANSWER 7"}], fields={"prompt": "q", "answer": {"field": "sol", "before": "\n"}})
    assert ds.records[0]["answer"] == "think"


def test_a_missing_field_names_the_record_and_lists_its_fields(tmp_path):
    f = _write(tmp_path / "d.jsonl", [GSM8K[0], {"query": "q", "answer": "#### 1"}])
    with pytest.raises(DataError, match=r"d.jsonl, line 2.*reads the field 'question'.*its fields are \['answer', 'query'\]"):
        load_records(f, fields="gsm8k")
    f = _write(tmp_path / "e.jsonl", [{"question": "q", "answer": "no marker here"}])
    with pytest.raises(DataError, match=r"e.jsonl, line 1.*has no '####'"):
        load_records(f, fields="gsm8k")


def test_bad_mappings_are_config_errors():
    with pytest.raises(ConfigError, match="not a preset; presets are"):
        resolve_fields("squad")
    with pytest.raises(ConfigError, match="needs 'field'"):
        resolve_fields({"answer": {"after": "####"}})
    with pytest.raises(ConfigError, match="both 'after' and 'before'"):
        resolve_fields({"answer": {"field": "a", "after": "#", "before": "#"}})
    with pytest.raises(ConfigError, match="not valid"):
        resolve_fields({"prompt": "{unclosed"})
    assert resolve_fields(None) is None and resolve_fields({}) is None
    assert set(PRESETS) == {"gsm8k", "gsm8k-sft", "alpaca"}
    assert map_record({"a": 1, "b": 2}, {"x": "a"}, "here") == {"b": 2, "x": 1}


def test_the_config_key_takes_a_mapping_a_preset_or_dotted_overrides(tmp_path):
    from posttrain.algorithms.rl import RLConfig
    from posttrain.algorithms.sft import SFTConfig

    cfg = load_config(SFTConfig, None, ["data.fields=alpaca"])
    assert cfg.data.fields == "alpaca"
    cfg = load_config(SFTConfig, None, ["data.fields.prompt=question", "data.fields.completion=answer"])
    assert cfg.data.fields == {"prompt": "question", "completion": "answer"}
    cfg = load_config(RLConfig, None, ["data.fields={prompt: question, answer: {field: answer, after: '####'}}"])
    assert cfg.data.fields["answer"] == {"field": "answer", "after": "####"}
    with pytest.raises(ConfigError, match="data.fields"):
        load_config(SFTConfig, None, ["data.fields=[a, b]"])
    # built-in data needs no mapping: a mapping there would be ignored, so it is refused
    from posttrain.algorithms.online import load_prompt_source
    from posttrain.algorithms.sft import load_sft_source

    with pytest.raises(ConfigError, match="data.train=builtin:world-sft is built-in data"):
        load_sft_source("builtin:world-sft", load_config(SFTConfig, None, ["data.fields=alpaca"]).data, 0)
    with pytest.raises(ConfigError, match="data.train=builtin:world-problems is built-in data"):
        load_prompt_source("builtin:world-problems", load_config(RLConfig, None, ["data.fields=gsm8k"]).data, 0)


def test_sft_trains_on_gsm8k_and_alpaca_layouts_from_the_command_line(tmp_path, model_dirs, capsys):
    from posttrain.cli import main

    for name, recs, preset in (("gsm8k", GSM8K * 4, "gsm8k-sft"), ("alpaca", ALPACA * 4, "alpaca")):
        f = _write(tmp_path / f"{name}.jsonl", recs)
        code = main(["sft", f"model.name_or_path={model_dirs['llama']}", f"data.train={f}", f"data.fields={preset}",
                     "data.eval=null", "train.max_steps=1", f"train.output_dir={tmp_path / name}", "train.progress=false"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "kept 8" in out.out + out.err


# --------------------------------------------------------------------------- directories and Arrow


def _arrow_stream(path, rows):
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(path), table.schema) as w:
        w.write_table(table)


def test_a_save_to_disk_directory_and_arrow_and_parquet_shards_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the layout datasets' save_to_disk writes: Arrow stream shards listed in state.json
    d = tmp_path / "saved"
    d.mkdir()
    _arrow_stream(d / "data-00000-of-00002.arrow", GSM8K[:1])
    _arrow_stream(d / "data-00001-of-00002.arrow", GSM8K[1:])
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00002.arrow"},
                                                              {"filename": "data-00001-of-00002.arrow"}]}))
    (d / "dataset_info.json").write_text("{}")
    ds = load_records(d, fields="gsm8k")
    assert [r["answer"] for r in ds.records] == ["72", "10"]
    assert ds.where(1, "prompt").startswith(f"{d}, data-00001-of-00002.arrow, row 0")
    # one Arrow file in the random-access file format
    table = pa.Table.from_pylist(ALPACA)
    with pa.ipc.new_file(str(tmp_path / "a.arrow"), table.schema) as w:
        w.write_table(table)
    assert load_records(tmp_path / "a.arrow", fields="alpaca").records[1]["completion"] == "Bonjour"
    # a directory of Parquet shards, in name order
    p = tmp_path / "pq"
    p.mkdir()
    pq.write_table(pa.Table.from_pylist(ALPACA[1:]), p / "part-1.parquet")
    pq.write_table(pa.Table.from_pylist(ALPACA[:1]), p / "part-0.parquet")
    assert [r["completion"] for r in load_records(p, fields="alpaca").records] == ["1. Eat well. 2. Move. 3. Sleep.",
                                                                                  "Bonjour"]


def test_directory_errors(tmp_path):
    d = tmp_path / "dd"
    (d / "train").mkdir(parents=True)
    (d / "test").mkdir()
    (d / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(DataError, match=r"DatasetDict.*\['test', 'train'\].*dd/test"):
        load_records(d)
    m = tmp_path / "mixed"
    m.mkdir()
    _write(m / "a.jsonl", ALPACA)
    (m / "b.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="shards of several types"):
        load_records(m)
    s = tmp_path / "broken"
    s.mkdir()
    (s / "state.json").write_text(json.dumps({"_data_files": [{"filename": "gone.arrow"}]}))
    with pytest.raises(DataError, match="missing"):
        load_records(s)
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="could not read the file as Arrow"):
        load_records(tmp_path / "bad.arrow")


def test_real_datasets_save_to_disk_and_dataset_objects_load(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets extra (pip install 'posttrain[datasets]') is "
                                                      "not installed")
    ds = datasets.Dataset.from_list(GSM8K)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [r["answer"] for r in load_records(tmp_path / "saved", fields="gsm8k").records] == ["72", "10"]
    assert load_records(ds, fields="gsm8k").records[0]["answer"] == "72"
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict"):
        load_records(tmp_path / "dd")
    assert len(load_records(tmp_path / "dd" / "train", fields="gsm8k")) == 2
