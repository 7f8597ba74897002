"""The command line: bad input gets one clear paragraph and exit status 2, never a traceback."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from posttrain.cli import main
from posttrain.data import write_jsonl
from posttrain.world.datasets import sft_record
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama", hidden=32).save_pretrained(d)
    world_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(p, [sft_record(q) for q in generate_problems(12, seed=5)])
    return p


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _sft(capsys, model_dir, tmp_path, *extra):
    return _run(capsys, "sft", f"model.name_or_path={model_dir}", f"train.output_dir={tmp_path / 'run'}",
                "data.eval=null", "train.max_steps=2", "train.progress=false", *extra)


def test_sft_runs_from_the_command_line(capsys, model_dir, data_file, tmp_path):
    code, out, err = _sft(capsys, model_dir, tmp_path, f"data.train={data_file}", "train.save_every=1")
    assert code == 0, err
    assert "done: 2 steps" in out and "encoded 12 records" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # resume=auto on a finished run trains nothing more and keeps the final model
    code, out, err = _sft(capsys, model_dir, tmp_path, f"data.train={data_file}", "train.resume=auto")
    assert code == 0 and "resumed from" in out and "at step 2/2" in out


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_a_run_without_sharding_prints_no_deepspeed_line(model_dir, data_file, tmp_path):
    # posttrain imports deepspeed only for train.sharding=zero2/zero3, but accelerate and transformers
    # import it wherever it is installed (save_pretrained checks for its engine), and on a machine
    # without CUDA that import used to log "Setting accelerator to CPU ..."
    script = ("import sys; import posttrain.cli, posttrain.algorithms.sft, posttrain.train.engine; "
              "assert 'deepspeed' not in sys.modules, 'posttrain imported deepspeed'; "
              "sys.exit(posttrain.cli.main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # (in-process runs set it)
    r = subprocess.run([sys.executable, "-c", script, "sft", f"model.name_or_path={model_dir}",
                        f"data.train={data_file}", "data.eval=null", "train.max_steps=1", "train.progress=false",
                        f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "done: 1 steps" in r.stdout, r.stdout + r.stderr
    for line in (r.stdout + r.stderr).splitlines():
        assert "accelerator" not in line.lower() and "deepspeed" not in line.lower(), line


def test_unknown_config_key(capsys):
    code, _, err = _run(capsys, "sft", "train.learning_rate=1e-4")
    assert code == 2
    assert "error: Config key 'train.learning_rate' does not exist" in err and "Traceback" not in err


def test_malformed_jsonl_names_line(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(sft_record(generate_problems(1, seed=0)[0]))
    bad.write_text(good + "\n" + good + "\n" + '{"messages": [{"role": "user", "content": "hi"}\n')
    code, _, err = _sft(capsys, model_dir, tmp_path, f"data.train={bad}")
    assert code == 2 and "line 3" in err and str(bad) in err and "Traceback" not in err


@pytest.mark.parametrize(
    "record, fragments",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
         ["line 2", "messages[1].content"]),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
         ["line 2", "messages[0].role"]),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
         ["line 2", "messages[1].role", "bot"]),
        ({"prompt": "q", "completion": 3}, ["line 2", "completion"]),
    ],
)
def test_bad_records_are_named(capsys, model_dir, tmp_path, record, fragments):
    f = tmp_path / "d.jsonl"
    first = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    f.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n")
    code, _, err = _sft(capsys, model_dir, tmp_path, f"data.train={f}")
    assert code == 2, err
    for frag in fragments:
        assert frag in err
    assert "Traceback" not in err


def test_tokenizer_without_chat_template_or_pad(capsys, tmp_path, data_file):
    d = tmp_path / "m"
    tiny_model("llama", hidden=32).save_pretrained(d)
    tok = world_tokenizer()
    saved_template = tok.chat_template
    try:
        tok.chat_template = None
        tok.save_pretrained(d)
    finally:
        tok.chat_template = saved_template
    code, _, err = _sft(capsys, d, tmp_path, f"data.train={data_file}")
    assert code == 2 and "chat template" in err and "Fix:" in err
    # the fix the message suggests works: pass a template
    template = tmp_path / "t.jinja"
    template.write_text(saved_template)
    code, _, err = _sft(capsys, d, tmp_path, f"data.train={data_file}", f"model.chat_template={template}")
    assert code == 0, err


def test_partial_checkpoint_refused_from_cli(capsys, model_dir, data_file, tmp_path):
    code, _, err = _sft(capsys, model_dir, tmp_path, f"data.train={data_file}", "train.save_every=1")
    assert code == 0, err
    ck = tmp_path / "run" / "checkpoints" / "step-000002"
    (ck / "checkpoint.json").unlink()
    code, _, err = _sft(capsys, model_dir, tmp_path, f"data.train={data_file}", f"train.resume={ck}")
    assert code == 2 and "partial" in err and "Traceback" not in err


def test_missing_model_dir(capsys, tmp_path, data_file):
    code, _, err = _run(capsys, "sft", f"model.name_or_path={tmp_path / 'nope'}", f"data.train={data_file}",
                        f"train.output_dir={tmp_path / 'r'}")
    assert code == 2 and "nope" in err and "Traceback" not in err


def test_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "train.lr" in out and "data.packing" in out and "model.name_or_path" in out


def _pref_file(tmp_path, records):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f


def _pref(capsys, model_dir, tmp_path, command, *extra):
    return _run(capsys, command, f"model.name_or_path={model_dir}", f"train.output_dir={tmp_path / 'run'}",
                "data.eval=null", "train.max_steps=1", "train.progress=false", *extra)


GOOD_PAIR = {"prompt": "q", "chosen": "1 + 1 = 2", "rejected": "1 + 1 = 3"}


@pytest.mark.parametrize(
    "command, record, extra, fragments",
    [
        ("dpo", {"prompt": "q", "chosen": "same", "rejected": "same"}, [], ["line 2", "identical"]),
        ("dpo", {"prompt": "q", "chosen": "", "rejected": "x"}, [], ["line 2", "chosen"]),
        ("rm", {"prompt": "q", "chosen": "a", "rejected": ""}, [], ["line 2", "rejected"]),
        ("dpo", {"prompt": "q", "completion": "a", "label": "desirable"}, ["loss.name=kto"], ["line 2", "label"]),
        ("dpo", {"prompt": "q", "responses": ["a"], "rewards": [1.0]}, ["loss.name=tilt"], ["line 2", "responses"]),
        ("dpo", {"prompt": "q", "responses": ["a", "b"], "rewards": [1.0, "nan"]}, ["loss.name=tilt"],
         ["line 2", "rewards"]),
    ],
)
def test_bad_preference_records_are_named(capsys, model_dir, tmp_path, command, record, extra, fragments):
    first = {k: v for k, v in record.items()}
    if "chosen" in record:
        first = GOOD_PAIR
    elif "label" in record:
        first = {"prompt": "q", "completion": "a", "label": True}
    elif "responses" in record:
        first = {"prompt": "q", "responses": ["a", "b"], "rewards": [1.0, 0.0]}
    f = _pref_file(tmp_path, [first, record])
    code, _, err = _pref(capsys, model_dir, tmp_path, command, f"data.train={f}", *extra)
    assert code == 2, err
    for frag in fragments:
        assert frag in err, err
    assert "Traceback" not in err


def test_dpo_and_rm_run_from_the_command_line(capsys, model_dir, tmp_path):
    f = _pref_file(tmp_path, [GOOD_PAIR, {"prompt": "r", "chosen": "2 * 3 = 6", "rejected": "2 * 3 = 5"}])
    code, out, err = _pref(capsys, model_dir, tmp_path / "d", "dpo", f"data.train={f}", "loss.name=ipo")
    assert code == 0, err
    assert "done: 1 steps" in out and "loss ipo: paired data, reference yes" in out
    code, out, err = _pref(capsys, model_dir, tmp_path / "r", "rm", f"data.train={f}")
    assert code == 0, err
    assert "reward model in" in out


@pytest.mark.parametrize("loss, source", [("dpo", "world-pairs"), ("ipo", "world-pairs"), ("hinge", "world-pairs"),
                                          ("dpop", "world-pairs"), ("simpo", "world-pairs"), ("orpo", "world-pairs"),
                                          ("kto", "world-unpaired"), ("tilt", "world-ranked")])
def test_every_preference_loss_from_the_command_line(capsys, model_dir, tmp_path, loss, source):
    code, out, err = _run(capsys, "dpo", f"model.name_or_path={model_dir}", f"train.output_dir={tmp_path / 'run'}",
                          f"loss.name={loss}", f"data.train=builtin:{source}", f"data.eval=builtin:{source}-heldout",
                          "data.world_examples=6", "data.world_eval_examples=4", "train.max_steps=2",
                          "train.micro_batch_size=3", "train.progress=false")
    assert code == 0, err
    assert "done: 2 steps" in out and "eval: eval_loss=" in out


CONFIGS = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs"


def test_world_config_with_own_data_does_not_evaluate_the_world(capsys, model_dir, data_file, tmp_path):
    """data.eval=auto: the world's held-out set only when the training data is the world's."""
    code, out, err = _run(capsys, "sft", "--config", str(CONFIGS / "sft_tiny_world.yaml"),
                          f"model.name_or_path={model_dir}", f"data.train={data_file}", "train.max_steps=1",
                          f"train.output_dir={tmp_path / 'own'}", "train.progress=false")
    assert code == 0, err
    assert "eval data" not in out and "eval: " not in out
    code, out, err = _run(capsys, "sft", "--config", str(CONFIGS / "sft_tiny_world.yaml"),
                          f"model.name_or_path={model_dir}", "data.world_examples=8", "data.world_eval_examples=4",
                          "train.max_steps=1", f"train.output_dir={tmp_path / 'world'}", "train.progress=false")
    assert code == 0, err
    assert "eval data" in out and "eval: eval_loss=" in out


def test_preference_eval_auto_follows_the_training_source(capsys, model_dir, tmp_path):
    code, out, err = _run(capsys, "dpo", f"model.name_or_path={model_dir}", "loss.name=kto",
                          "data.train=builtin:world-unpaired", "data.world_examples=6", "data.world_eval_examples=4",
                          "train.max_steps=1", f"train.output_dir={tmp_path / 'k'}", "train.progress=false")
    assert code == 0, err
    assert "eval: eval_loss=" in out


@pytest.mark.parametrize("config", ["dpo_tiny_world.yaml", "rm_tiny_world.yaml", "rl_tiny_world.yaml"])
def test_configs_that_need_the_quickstart_say_so(capsys, tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)  # no runs/quickstart here
    code, _, err = _run(capsys, config.split("_")[0], "--config", str(CONFIGS / config))
    assert code == 2 and "make quickstart" in err and "model.name_or_path" in err and "Traceback" not in err


def test_help_texts_describe_what_the_commands_do(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "reward model" in out and "DPO" in out and "evaluate base, SFT, evaluate again" not in out
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    out = capsys.readouterr().out
    assert "reward model" in out and "runs/quickstart" in out
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "train.overwrite_output_dir" in out and "train.save_total_limit" in out and "in (0.0, 1.0]" in out
