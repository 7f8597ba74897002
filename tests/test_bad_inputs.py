"""New users' trials, kept as a regression suite: 169 bad inputs through the command line.

Every case must end cleanly: exit status 2, one paragraph naming the place (key, file, line,
field, directory) and the fix, and never a traceback from inside a library. The classes are
the ones the hardening trial found: config values, model directories, data files,
checkpoints, the file system, and the eval command's arguments. (Interruption is covered in
test_run_safety.py.)
"""

from __future__ import annotations

import itertools
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from posttrain.cli import main
from posttrain.models import loading
from posttrain.world.datasets import sft_record, write_jsonl
from posttrain.world.preferences import preference_records, unpaired_records
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]     # workspace -> argv
    expect: tuple[str, ...]               # fragments of the error paragraph
    setup: Callable[[Path], None] | None = None
    fix: bool = True                      # the paragraph carries "Fix:"


def _w(ws: Path, name: str) -> str:
    return str(ws / name)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a tiny model, data files and a finished run with checkpoints."""
    ws = tmp_path_factory.mktemp("ws")
    model = ws / "model"
    tiny_model("llama", hidden=32).save_pretrained(model)
    world_tokenizer().save_pretrained(model)
    write_jsonl(ws / "sft.jsonl", [sft_record(p) for p in generate_problems(12, seed=5)])
    write_jsonl(ws / "pairs.jsonl", preference_records(8, seed=1))
    write_jsonl(ws / "unpaired.jsonl", unpaired_records(8, seed=1))
    code = main(["sft", f"model.name_or_path={model}", f"data.train={ws / 'sft.jsonl'}", "data.eval=null",
                 "train.max_steps=2", "train.save_every=1", f"train.output_dir={ws / 'run'}", "train.progress=false"])
    assert code == 0
    return ws


_fresh = itertools.count()


def sft(*extra, out=None):
    """An sft command line; each case gets a fresh output directory unless ``out`` names one."""
    return lambda ws: ["sft", f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'sft.jsonl'}",
                       "data.eval=null", "train.max_steps=1",
                       f"train.output_dir={ws / (out or f'out-{next(_fresh)}')}",
                       "train.progress=false", *[e(ws) if callable(e) else e for e in extra]]


def pref(cmd, *extra, data="pairs.jsonl"):
    return lambda ws: [cmd, f"model.name_or_path={ws / 'model'}", f"data.train={ws / data}", "data.eval=null",
                       "train.max_steps=1", f"train.output_dir={ws / f'out-{cmd}-{next(_fresh)}'}",
                       "train.progress=false",
                       *[e(ws) if callable(e) else e for e in extra]]


def copied(name, edit, source="model"):
    """A fresh copy of the workspace's ``source`` directory (the tiny model, or the finished run), edited."""
    def setup(ws):
        d = ws / name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(ws / source, d)
        edit(d)
    return setup


def copy_model(name, edit):
    return copied(name, edit)


def ckpt_copy(name, edit):
    """A copy of the finished run (checkpoints step-000001/2), edited."""
    return copied(name, edit, source="run")


def write(name, text, mode="w"):
    def setup(ws):
        p = ws / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if mode == "wb":
            p.write_bytes(text)
        else:
            p.write_text(text)
    return setup


def lines(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
PAIR = {"prompt": "q", "chosen": "1 + 1 = 2", "rejected": "1 + 1 = 3"}


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _legacy(d: Path):
    ck = d / "checkpoints" / "step-000002"
    (ck / "trainer_state.json").unlink()
    (ck / "trainer_state.safetensors").unlink()
    (ck / "trainer_state.pt").write_bytes(pickle.dumps({"step": 2}))
    meta = json.loads((ck / "checkpoint.json").read_text())
    meta.pop("files")
    (ck / "checkpoint.json").write_text(json.dumps(meta))


def _edit_config(d: Path, **kv):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


RESUME = ["train.max_steps=2", "train.save_every=1"]

CASES = [
    # ---- config values (40)
    Case("unknown-key", sft("train.learning_rate=1e-4"), ("'train.learning_rate' does not exist", "train.lr")),
    Case("typo-key", sft("train.max_step=3"), ("Did you mean 'train.max_steps'",)),
    Case("lr-text", sft("train.lr=fast"), ("'train.lr'", "not a number")),
    Case("lr-nan", sft("train.lr=.nan"), ("'train.lr'", "not a finite number")),
    Case("lr-inf", sft("train.lr=inf"), ("'train.lr'", "not a finite number")),
    Case("lr-zero", sft("train.lr=0"), ("'train.lr'", "out of range")),
    Case("lr-negative", sft("train.lr=-1e-4"), ("'train.lr'", "out of range")),
    Case("beta1-one", sft("train.adam_beta1=1.0"), ("'train.adam_beta1'", "[0.0, 1.0)")),
    Case("beta2-one", sft("train.adam_beta2=1"), ("'train.adam_beta2'",)),
    Case("eps-zero", sft("train.adam_eps=0"), ("'train.adam_eps'",)),
    Case("clip-zero", sft("train.max_grad_norm=0"), ("'train.max_grad_norm'",)),
    Case("warmup-big", sft("train.warmup_ratio=1.5"), ("'train.warmup_ratio'",)),
    Case("floor-nan", sft("train.min_lr_ratio=nan"), ("'train.min_lr_ratio'", "finite")),
    Case("neftune-zero", sft("train.neftune_alpha=0"), ("'train.neftune_alpha'",)),
    Case("epochs-inf", sft("train.epochs=.inf"), ("'train.epochs'", "finite")),
    Case("nothing-to-train", sft("train.epochs=0", "train.max_steps=0"), ("nothing to train",)),
    Case("mbs-zero", sft("train.micro_batch_size=0"), ("'train.micro_batch_size'",)),
    Case("mbs-fraction", sft("train.micro_batch_size=2.5"), ("'train.micro_batch_size'", "not an integer")),
    Case("ga-negative", sft("train.grad_accum=-1"), ("'train.grad_accum'",)),
    Case("max-length-tiny", sft("data.max_length=4"), ("'data.max_length'",)),
    Case("packing-maybe", sft("data.packing=maybe"), ("'data.packing'", "not a boolean")),
    Case("overlong-cut", sft("data.overlong=cut"), ("'data.overlong'", "'truncate'")),
    Case("dpo-beta-zero", pref("dpo", "loss.beta=0"), ("'loss.beta'",)),
    Case("smoothing-half", pref("dpo", "loss.label_smoothing=0.5"), ("'loss.label_smoothing'",)),
    Case("loss-unknown", pref("dpo", "loss.name=foo"), ("'loss.name'", "'dpo'")),
    Case("rm-mean-pooling", pref("rm", "loss.pooling=mean"), ("'loss.pooling'", "transformers")),
    Case("rm-hinge-zero", pref("rm", "loss.name=hinge", "loss.hinge_margin=0"), ("'loss.hinge_margin'",)),
    Case("report-to-slack", sft("train.report_to=[slack]"), ("'train.report_to'", "slack")),
    Case("override-no-equals", sft("train.lr"), ("not of the form key=value",)),
    Case("config-missing", lambda ws: ["sft", "--config", str(ws / "nope.yaml")], ("does not exist",)),
    Case("config-bad-yaml", lambda ws: ["sft", "--config", _w(ws, "bad.yaml")], ("not valid YAML",),
         setup=write("bad.yaml", "train: [1, 2\n")),
    Case("config-list", lambda ws: ["sft", "--config", _w(ws, "list.yaml")], ("mapping",),
         setup=write("list.yaml", "- 1\n- 2\n"), fix=False),
    Case("section-scalar", sft("train=3"), ("'train' is a section",)),
    Case("dtype-fp8", sft("model.dtype=float8"), ("'model.dtype'",)),
    Case("huge-plan", sft("train.epochs=1e9", "train.max_steps=0"), ("optimizer steps", "train.epochs")),
    Case("huge-world", lambda ws: ["sft", "data.world_examples=1e12"], ("'data.world_examples'",)),
    Case("qs-stage-foo", lambda ws: ["quickstart", "stages=[foo]", f"output_dir={ws / 'qs'}"], ("'stages'", "foo")),
    Case("qs-kto", lambda ws: ["quickstart", "dpo_losses=[kto]", f"output_dir={ws / 'qs'}"], ("'dpo_losses'",)),
    Case("qs-rm-only", lambda ws: ["quickstart", "stages=[rm]", f"output_dir={ws / 'qs'}"], ("'sft' must be",)),
    Case("yaml-python-tag", lambda ws: ["sft", "--config", _w(ws, "evil.yaml")], ("not valid YAML",),
         setup=write("evil.yaml", "train: !!python/object/apply:os.system ['touch PWNED']\n")),
    # ---- model directories and devices (25)
    Case("model-missing", sft(lambda ws: f"model.name_or_path={ws / 'nope'}"), ("no such directory",)),
    Case("model-quickstart", sft("model.name_or_path=runs/quickstart/sft/final"), ("make quickstart",)),
    Case("model-is-file", sft(lambda ws: f"model.name_or_path={ws / 'sft.jsonl'}"), ("is a file",)),
    Case("model-no-config", sft(lambda ws: f"model.name_or_path={ws / 'm-noconf'}"), ("no config.json",),
         setup=copy_model("m-noconf", lambda d: (d / "config.json").unlink())),
    Case("model-bad-config", sft(lambda ws: f"model.name_or_path={ws / 'm-badconf'}"), ("not valid JSON",),
         setup=copy_model("m-badconf", lambda d: (d / "config.json").write_text("{"))),
    Case("model-pickle", sft(lambda ws: f"model.name_or_path={ws / 'm-pickle'}"), ("pickle", "safetensors"),
         setup=copy_model("m-pickle", lambda d: ((d / "model.safetensors").rename(d / "pytorch_model.bin")))),
    Case("model-no-weights", sft(lambda ws: f"model.name_or_path={ws / 'm-noweights'}"), ("no weights",),
         setup=copy_model("m-noweights", lambda d: (d / "model.safetensors").unlink())),
    Case("model-truncated", sft(lambda ws: f"model.name_or_path={ws / 'm-trunc'}"), ("Could not load",),
         setup=copy_model("m-trunc", lambda d: _truncate(d / "model.safetensors"))),
    Case("model-custom-code", sft(lambda ws: f"model.name_or_path={ws / 'm-code'}"), ("never runs code",),
         setup=copy_model("m-code", lambda d: _edit_config(d, model_type="evil", auto_map={"AutoModelForCausalLM": "x.Y"}))),
    Case("model-hub-offline", sft("model.name_or_path=org/model"), ("cannot be reached",)),
    Case("device-cuda", sft("model.device=cuda"), ("'model.device'", "no CUDA")),
    Case("device-cuda7", sft("model.device=cuda:7"), ("'model.device'",)),
    Case("device-tpu", sft("model.device=tpu"), ("'model.device'",)),
    Case("flash-attn", sft("model.attn_implementation=flash_attention_2"), ("flash", "sdpa")),
    Case("max-length-over-limit", sft("data.max_length=100000"), ("100000", "512")),
    Case("pad-not-in-vocab", sft("model.pad_token=<nope>"), ("'model.pad_token'",)),
    Case("template-missing-file", sft("model.chat_template=/missing/file.jinja"), ("'model.chat_template'",
                                                                                  "no such file")),
    Case("template-empty-file", sft(lambda ws: f"model.chat_template={ws / 'empty.jinja'}"), ("is empty",),
         setup=write("empty.jinja", "")),
    Case("tokenizer-missing", sft(lambda ws: f"model.tokenizer={ws / 'nope-tok'}"), ("'model.tokenizer'",)),
    Case("not-a-causal-lm", sft(lambda ws: f"model.name_or_path={ws / 'm-bert'}"), ("does not use", "BertLMHeadModel"),
         setup=copy_model("m-bert", lambda d: _edit_config(d, model_type="bert", architectures=["BertModel"]))),
    Case("reference-missing", pref("dpo", lambda ws: f"loss.reference={ws / 'nope'}"), ("'loss.reference'",)),
    Case("reference-vocab", pref("dpo", lambda ws: f"loss.reference={ws / 'm-vocab'}"), ("vocabulary",),
         setup=lambda ws: tiny_model("llama", hidden=32, vocab_size=300).save_pretrained(ws / "m-vocab")),
    Case("builtin-unknown", sft("model.name_or_path=builtin:huge"), ("builtin:tiny-world-base",)),
    Case("no-chat-template", sft(lambda ws: f"model.name_or_path={ws / 'm-notemplate'}"), ("model.chat_template",),
         setup=copy_model("m-notemplate", lambda d: (
             (d / "chat_template.jinja").unlink() if (d / "chat_template.jinja").exists() else None,
             _edit_config_tok(d, chat_template=None)))),
    Case("no-pad-token", sft(lambda ws: f"model.name_or_path={ws / 'm-nopad'}"), ("model.pad_token=",),
         setup=copy_model("m-nopad", lambda d: _edit_config_tok(d, pad_token=None))),
    # ---- data files (22)
    Case("data-missing", sft(lambda ws: f"data.train={ws / 'nope.jsonl'}"), ("no such file",)),
    Case("data-dir", sft(lambda ws: f"data.train={ws / 'model'}"), ("is a directory without data shards",)),
    Case("data-csv", sft(lambda ws: f"data.train={ws / 'd.csv'}"), ("unsupported file type",),
         setup=write("d.csv", "a,b\n")),
    Case("data-bad-json", sft(lambda ws: f"data.train={ws / 'bad.jsonl'}"), ("line 2", "invalid JSON"),
         setup=write("bad.jsonl", lines(CHAT, '{"messages": ['))),
    Case("data-unterminated", sft(lambda ws: f"data.train={ws / 'unterm.jsonl'}"),
         ("line 2", "(Unterminated string starting at column 14)"),
         setup=write("unterm.jsonl", lines(CHAT) + '{"messages": "abc')),
    Case("data-not-utf8", sft(lambda ws: f"data.train={ws / 'latin.jsonl'}"), ("line 1", "UTF-8"),
         setup=write("latin.jsonl", b'{"prompt": "caf\xe9", "completion": "x"}\n', mode="wb")),
    Case("data-empty", sft(lambda ws: f"data.train={ws / 'empty.jsonl'}"), ("empty",), setup=write("empty.jsonl", "\n")),
    Case("data-not-object", sft(lambda ws: f"data.train={ws / 'list.jsonl'}"), ("line 1", "JSON object"),
         setup=write("list.jsonl", "[1, 2]\n")),
    Case("data-unknown-keys", sft(lambda ws: f"data.train={ws / 'keys.jsonl'}"), ("line 1", "format"),
         setup=write("keys.jsonl", lines({"question": "q", "answer_text": "a"}))),
    Case("data-mixed", sft(lambda ws: f"data.train={ws / 'mixed.jsonl'}"), ("line 2", "one format"),
         setup=write("mixed.jsonl", lines(CHAT, {"prompt": "q", "completion": "a"}))),
    Case("data-empty-assistant", sft(lambda ws: f"data.train={ws / 'emptyasst.jsonl'}"), ("line 1", "messages[1].content"),
         setup=write("emptyasst.jsonl", lines({"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": ""}]}))),
    Case("data-role-bot", sft(lambda ws: f"data.train={ws / 'bot.jsonl'}"), ("messages[1].role", "bot"),
         setup=write("bot.jsonl", lines({"messages": [{"role": "user", "content": "q"},
                                                      {"role": "bot", "content": "a"}]}))),
    Case("pairs-identical", pref("dpo", data="same.jsonl"), ("line 1", "identical"),
         setup=write("same.jsonl", lines({"prompt": "q", "chosen": "x", "rejected": "x"}))),
    Case("kto-label-text", pref("dpo", "loss.name=kto", data="kto.jsonl"), ("line 1", "label"),
         setup=write("kto.jsonl", lines({"prompt": "q", "completion": "a", "label": "good"}))),
    Case("tilt-one-response", pref("dpo", "loss.name=tilt", data="k1.jsonl"), ("line 1", "responses"),
         setup=write("k1.jsonl", lines({"prompt": "q", "responses": ["a"], "rewards": [1.0]}))),
    Case("reward-nan", pref("dpo", "loss.name=tilt", data="knan.jsonl"), ("line 1", "rewards"),
         setup=write("knan.jsonl", '{"prompt": "q", "responses": ["a", "b"], "rewards": [1.0, NaN]}\n')),
    Case("parquet-corrupt", sft(lambda ws: f"data.train={ws / 'bad.parquet'}"), ("Parquet",),
         setup=write("bad.parquet", b"PAR1garbage", mode="wb")),
    Case("eval-fraction-all", sft(lambda ws: f"data.train={ws / 'one.jsonl'}", "data.eval_fraction=0.5"),
         ("data.eval_fraction", "leaving none"), setup=write("one.jsonl", lines(CHAT))),
    Case("all-dropped", sft("data.max_length=8", "data.overlong=drop"), ("max_length",)),
    Case("data-builtin-unknown", sft("data.train=builtin:world-foo"), ("builtin:world-sft",)),
    Case("dpo-wrong-kind", pref("dpo", data="unpaired.jsonl"), ("needs preference records",)),
    Case("dpo-builtin-wrong-kind", pref("dpo", "data.train=builtin:world-unpaired"), ("builtin:world-pairs",)),
    # ---- checkpoints (8)
    Case("resume-missing", sft(lambda ws: f"train.resume={ws / 'nope'}", *RESUME, out="run"), ("does not exist",)),
    Case("resume-partial", sft("train.resume=auto", *RESUME, lambda ws: f"train.resume={ws / 'ck-partial/checkpoints/step-000002'}",
                               out="ck-partial"), ("partial",),
         setup=ckpt_copy("ck-partial", lambda d: (d / "checkpoints/step-000002/checkpoint.json").unlink())),
    Case("resume-corrupt-weights", sft(*RESUME, lambda ws: f"train.resume={ws / 'ck-trunc/checkpoints/step-000002'}",
                                       out="ck-trunc"), ("corrupt", "model.safetensors"),
         setup=ckpt_copy("ck-trunc", lambda d: _truncate(d / "checkpoints/step-000002/model/model.safetensors"))),
    Case("resume-corrupt-marker", sft(*RESUME, lambda ws: f"train.resume={ws / 'ck-json/checkpoints/step-000002'}",
                                      out="ck-json"), ("corrupt", "checkpoint.json"),
         setup=ckpt_copy("ck-json", lambda d: (d / "checkpoints/step-000002/checkpoint.json").write_text("{"))),
    Case("resume-other-model", sft(*RESUME, lambda ws: f"model.name_or_path={ws / 'm-big'}", "train.resume=auto",
                                   out="run"), ("different model",),
         setup=lambda ws: (tiny_model("llama", hidden=48).save_pretrained(ws / "m-big"),
                           world_tokenizer().save_pretrained(ws / "m-big"))),
    Case("resume-changed-lr", sft(*RESUME, "train.resume=auto", "train.lr=0.5", out="run"),
         ("train.lr: checkpoint",)),
    Case("resume-legacy-pickle", sft(*RESUME, lambda ws: f"train.resume={ws / 'ck-legacy/checkpoints/step-000002'}",
                                     out="ck-legacy"), ("pickle",), setup=ckpt_copy("ck-legacy", _legacy)),
    Case("resume-all-corrupt", sft(*RESUME, "train.resume=auto", out="ck-allbad"), ("every one is corrupt",),
         setup=ckpt_copy("ck-allbad", lambda d: [_truncate(c / "trainer_state.safetensors")
                                                 for c in (d / "checkpoints").iterdir()])),
    # ---- file system (6)
    Case("outdir-file", sft(out="sft.jsonl"), ("is a file",)),
    Case("outdir-under-file", sft(out="sft.jsonl/run"), ("lies under",)),
    Case("checkpoints-file", sft(out="fs-ckfile"), ("checkpoints",), setup=write("fs-ckfile/checkpoints", "x")),
    Case("outdir-existing-run", sft(out="run"), ("already holds an earlier run",)),
    Case("quickstart-foreign-dir", lambda ws: ["quickstart", f"output_dir={ws / 'model'}"], ("did not write",)),
    Case("world-data-out-file", lambda ws: ["world", "data", "--out", str(ws / "sft.jsonl")], ("is a file",)),
    # ---- eval command (4)
    Case("eval-model-missing", lambda ws: ["eval", f"model.name_or_path={ws / 'nope'}"],
         ("model.name_or_path", "no such directory")),
    Case("eval-n-zero", lambda ws: ["eval", f"model.name_or_path={ws / 'model'}", "eval.n=0"], ("'eval.n'",)),
    Case("eval-long-generation", lambda ws: ["eval", f"model.name_or_path={ws / 'model'}", "data.world_examples=2",
                                             "eval.max_new_tokens=100000"], ("position limit", "eval.max_new_tokens")),
    Case("eval-device-cuda", lambda ws: ["eval", f"model.name_or_path={ws / 'model'}", "model.device=cuda"],
         ("model.device",)),
]


def _edit_config_tok(d: Path, **kv):
    p = d / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    for k, v in kv.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


def _seq_classifier(ws):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = tiny_model("llama", hidden=32).config
    LlamaForSequenceClassification(LlamaConfig(**{**cfg.to_dict(), "num_labels": 1})).save_pretrained(ws / "m-rm")
    world_tokenizer().save_pretrained(ws / "m-rm")


def _small_vocab(ws):
    tiny_model("llama", hidden=32, vocab_size=300).save_pretrained(ws / "m-small")
    world_tokenizer().save_pretrained(ws / "m-small")


def _template(name, template):
    return copied(name, lambda d: _edit_config_tok(d, chat_template=template) or (
        (d / "chat_template.jinja").unlink() if (d / "chat_template.jinja").exists() else None))


def _edit_marker(name, **kv):
    def edit(d):
        p = d / "checkpoints/step-000002/checkpoint.json"
        meta = json.loads(p.read_text())
        meta.update(kv)
        p.write_text(json.dumps(meta))
    return ckpt_copy(name, edit)


QS = ["eval_problems=2", "curve_problems=1", "curve_points=0", "train_examples=8", "preference_pairs=4",
      "eval_pairs=2", "max_new_tokens=4", "sft.train.max_steps=1", "rm.train.max_steps=1", "dpo.train.max_steps=1"]


def qs(*extra):
    return lambda ws: ["quickstart", f"sft.model.name_or_path={ws / 'model'}", f"output_dir={ws / f'qs-{next(_fresh)}'}",
                       *QS, *[e(ws) if callable(e) else e for e in extra]]


# The second trial (an independent one, after the first round of fixes) found these; each was a
# traceback, a silently wrong run, or a misleading message before it was fixed.
ROUND2 = [
    Case("weights-unused-by-config", sft(lambda ws: f"model.name_or_path={ws / 'm-1layer'}"),
         ("does not use", "model.layers.1")),
    Case("reward-model-as-lm", sft(lambda ws: f"model.name_or_path={ws / 'm-rm'}"),
         ("score.weight", "LlamaForSequenceClassification"), setup=_seq_classifier),
    Case("tokenizer-past-embedding", sft(lambda ws: f"model.name_or_path={ws / 'm-small'}"),
         ("400 tokens", "only 300 rows"), setup=_small_vocab),
    Case("other-models-tokenizer", sft("model.tokenizer=builtin:tiny-world-base"), ("'model.tokenizer'", "rows")),
    Case("eval-no-template", lambda ws: ["eval", f"model.name_or_path={ws / 'm-notemplate'}", "data.world_examples=2"],
         ("no chat template", "model.chat_template"),
         setup=copied("m-notemplate", lambda d: _edit_config_tok(d, chat_template=None) or (
             (d / "chat_template.jinja").unlink() if (d / "chat_template.jinja").exists() else None))),
    Case("eval-template-renders-nothing", lambda ws: ["eval", f"model.name_or_path={ws / 'm-tpl-empty'}",
                                                      "data.world_examples=2"],
         ("empty prompt",), setup=_template("m-tpl-empty", "{% if false %}x{% endif %}")),
    Case("template-type-error", sft("model.chat_template={{ messages | length + 'x' }}"), ("raised TypeError",)),
    Case("template-zero-division", sft("model.chat_template={{ 1 // 0 }}"), ("ZeroDivisionError",)),
    Case("template-syntax", sft("model.chat_template={% for %}"), ("not valid Jinja", "model.chat_template")),
    Case("data-deep-nesting", sft(lambda ws: f"data.train={ws / 'deep.jsonl'}"), ("line 1", "nested too deeply"),
         setup=write("deep.jsonl", '{"messages": ' + "[" * 100000 + "]" * 100000 + "}\n")),
    Case("data-huge-integer", sft(lambda ws: f"data.train={ws / 'bigint.jsonl'}"), ("line 1", "digits"),
         setup=write("bigint.jsonl", '{"prompt": "q", "completion": "a", "id": ' + "9" * 5000 + "}\n")),
    Case("data-lone-surrogate", sft(lambda ws: f"data.train={ws / 'surrogate.jsonl'}"),
         ("line 1", "completion", "surrogate"),
         setup=write("surrogate.jsonl", '{"prompt": "q", "completion": "a\\ud800"}\n')),
    Case("data-duplicate-key", sft(lambda ws: f"data.train={ws / 'dup.jsonl'}"), ("line 1", "appears twice"),
         setup=write("dup.jsonl", '{"prompt": "q", "completion": "a", "completion": "b"}\n')),
    Case("data-two-formats", sft(lambda ws: f"data.train={ws / 'two.jsonl'}"), ("line 1", "more than one format"),
         setup=write("two.jsonl", lines({**CHAT, "prompt": "y", "completion": "x"}))),
    Case("pairs-all-dropped-prompt-fills", pref("dpo", "data.max_length=8"), ("every one of the", "data.max_length"),),
    Case("pairs-huge-margin", pref("rm", data="margin.jsonl"), ("line 1", "margin", "overflow"),
         setup=write("margin.jsonl", lines({**PAIR, "margin": 1e300}))),
    Case("yaml-int-key", lambda ws: ["sft", "--config", _w(ws, "intkey.yaml")], ("not a name",),
         setup=write("intkey.yaml", "train:\n  1: 2\n")),
    Case("yaml-duplicate-section", lambda ws: ["sft", "--config", _w(ws, "dup.yaml")], ("appears twice",),
         setup=write("dup.yaml", "train:\n  max_steps: 1\ntrain:\n  save_every: 1\n")),
    Case("yaml-utf16", lambda ws: ["sft", "--config", _w(ws, "u16.yaml")], ("not UTF-8",),
         setup=write("u16.yaml", "train:\n  lr: 0.001\n".encode("utf-16"), mode="wb")),
    Case("config-is-a-directory", lambda ws: ["sft", "--config", str(ws / "model")], ("is a directory",)),
    Case("override-huge-integer", sft("train.max_steps=" + "9" * 5000), ("'train.max_steps'",)),
    Case("override-subkey-of-value", sft("train.lr=1", "train.lr.x=2"), ("'train.lr'", "sub-keys")),
    Case("seed-too-large", sft("train.seed=99999999999999999999"), ("'train.seed'", "out of range")),
    Case("data-train-empty", sft("data.train="), ("'data.train' is empty",)),
    Case("template-is-directory", sft(lambda ws: f"model.chat_template={ws / 'model'}"), ("is a directory",)),
    Case("config-json-wrong-type", sft(lambda ws: f"model.name_or_path={ws / 'm-vocabstr'}"), ("config.json",),
         setup=copied("m-vocabstr", lambda d: _edit_config(d, vocab_size="400"))),
    Case("resume-from-final", sft(*RESUME, lambda ws: f"train.resume={ws / 'run' / 'final'}"),
         ("saved model", "model.name_or_path=")),
    Case("resume-from-checkpoints-dir", sft(*RESUME, lambda ws: f"train.resume={ws / 'run' / 'checkpoints'}"),
         ("directory of checkpoints", "step-000002")),
    Case("checkpoint-json-wrong-types", sft(*RESUME, lambda ws: f"train.resume={ws / 'ck-types/checkpoints/step-000002'}",
                                            out="ck-types"), ("corrupt", "model_signature"),
         setup=_edit_marker("ck-types", model_signature=None)),
    Case("outdir-name-too-long", sft(out="x" * 300), ("255",)),
    Case("outdir-dangling-link", sft(out="dangling/run"), ("symbolic link",),
         setup=lambda ws: (ws / "dangling").is_symlink() or (ws / "dangling").symlink_to("/nonexistent/place")),
    Case("overwrite-deletes-the-model", sft(lambda ws: f"model.name_or_path={ws / 'ow' / 'final'}",
                                            "train.overwrite_output_dir=true", out="ow"), ("would delete",),
         setup=ckpt_copy("ow", lambda d: None)),
    Case("world-data-path-clash", lambda ws: ["world", "data", "--out", str(ws / "clash"), "--train", "2",
                                              "--heldout", "1"], ("sft_train.jsonl",),
         setup=lambda ws: (ws / "clash" / "sft_train.jsonl").mkdir(parents=True, exist_ok=True)),
    Case("world-build-over-a-model", lambda ws: ["world", "build", "--out", str(ws / "model"), "--docs", "10"],
         ("--overwrite",)),
    Case("world-build-batch-too-big", lambda ws: ["world", "build", "--out", str(ws / "wb"), "--docs", "50",
                                                  "--batch-size", "100000", "--probe-problems", "1"],
         ("nothing to train",)),
    Case("qs-own-data", qs("sft.data.train=x.jsonl"), ("'sft.data.train'", "sets it itself")),
    Case("qs-loss-name", qs("dpo.loss.name=ipo"), ("dpo_losses",)),
    Case("qs-key-prefix", qs("rm.loss.pooling=mean"), ("rm.loss.pooling=last",)),
    Case("qs-reference-checked-first", qs("dpo.loss.reference=/nope"), ("'dpo.loss.reference'",)),
    Case("qs-ranked-rm", qs("rm.loss.name=listwise"), ("'rm.loss.name'", "ranked")),
    Case("qs-device", qs("sft.model.device=cuda"), ("'sft.model.device'",)),
]
# The third trial (after the second round of fixes).
ROUND3 = [
    Case("model-is-a-run-dir", sft(lambda ws: f"model.name_or_path={ws / 'run'}"), ("run directory", "final")),
    Case("model-is-a-checkpoint", lambda ws: ["eval", f"model.name_or_path={ws / 'run/checkpoints/step-000001'}"],
         ("training checkpoint", "model")),
    Case("model-is-empty", sft(lambda ws: f"model.name_or_path={ws / 'empty-dir'}"), ("it is empty",),
         setup=lambda ws: (ws / "empty-dir").mkdir(exist_ok=True)),
    Case("resume-auto-final-only", sft("train.resume=auto", out="final-only"), ("no checkpoint", "final"),
         setup=copied("final-only", lambda d: shutil.rmtree(d / "checkpoints"), source="run")),
    Case("fresh-into-final-only", sft(out="final-only2"), ("already holds", "a final/ model"),
         setup=copied("final-only2", lambda d: shutil.rmtree(d / "checkpoints"), source="run")),
    Case("overwrite-and-resume", sft("train.resume=auto", "train.overwrite_output_dir=true"), ("both set",)),
    Case("normalize-constant-unused", sft("loss.normalize_constant=256"), ("loss.normalization",)),
    Case("sft-eval-wrong-format", sft(lambda ws: f"data.eval={ws / 'pairs.jsonl'}"), ("data.eval", "preference")),
    Case("dpo-eval-wrong-format", pref("dpo", lambda ws: f"data.eval={ws / 'sft.jsonl'}"),
         ("data.eval", "conversational")),
    Case("world-data-existing-files", lambda ws: ["world", "data", "--out", str(ws / "mydata")], ("--overwrite",),
         setup=write("mydata/sft_train.jsonl", lines(CHAT))),
    Case("qs-duplicate-loss", qs("dpo_losses=[dpo,dpo]"), ("twice",)),
    Case("qs-max-length-before-eval", qs("sft.data.max_length=100000"), ("'sft.data.max_length'",)),
]
def _nan_model(ws):
    import torch

    m = tiny_model("llama", hidden=32)
    with torch.no_grad():
        m.model.norm.weight[0] = float("nan")
    m.save_pretrained(ws / "m-nan", safe_serialization=True)
    world_tokenizer().save_pretrained(ws / "m-nan")


def _rm_run(ws):
    if not (ws / "rm-run").exists():
        assert main(["rm", f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'pairs.jsonl'}", "data.eval=null",
                     "train.max_steps=1", f"train.output_dir={ws / 'rm-run'}", "train.progress=false"]) == 0


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "train: {lr: 0.001}\n"

# The fourth trial (after the third round of fixes).
ROUND4 = [
    Case("user-config-in-output-dir", sft(out="proj"), ("config.yaml", "did not write"),
         setup=write("proj/config.yaml", "# my config\ntrain:\n  lr: 0.001\n")),
    Case("metrics-path-is-a-directory", sft(out="mdir"), ("metrics.jsonl", "is a directory"),
         setup=lambda ws: (ws / "mdir" / "metrics.jsonl").mkdir(parents=True, exist_ok=True)),
    Case("flex-attention-on-cpu", sft("model.attn_implementation=flex_attention"), ("flex_attention", "sdpa")),
    Case("nan-weights", sft(lambda ws: f"model.name_or_path={ws / 'm-nan'}"), ("NaN", "model.norm.weight"),
         setup=_nan_model),
    Case("weight-decay-destroys", sft("train.weight_decay=1e10"), ("weight_decay",)),
    Case("chat-template-empty", sft("model.chat_template="), ("'model.chat_template' is empty",)),
    Case("resume-sft-from-rm-checkpoint", sft(*RESUME, lambda ws: f"train.resume={ws / 'rm-run/checkpoints/step-000001'}"),
         ("kind of run", "LlamaForSequenceClassification"), setup=_rm_run),
    Case("conversation-pairs-other-prompt", pref("dpo", data="ufb.jsonl"), ("line 1", "whole conversation"),
         setup=write("ufb.jsonl", lines({"prompt": "hi", "chosen": [{"role": "user", "content": "hello"},
                                                                    {"role": "assistant", "content": "a"}],
                                         "rejected": [{"role": "user", "content": "hello"},
                                                      {"role": "assistant", "content": "b"}]}))),
    Case("world-build-tiny-vocab", lambda ws: ["world", "build", "--out", str(ws / "wb2"), "--vocab-size", "10"],
         ("--vocab-size",), fix=False),
    Case("data-url", sft("data.train=https://example.com/d.jsonl"), ("https://example.com/d.jsonl", "URLs")),
    Case("yaml-alias-bomb", lambda ws: ["sft", "--config", _w(ws, "laughs.yaml")], ("expands",),
         setup=write("laughs.yaml", LAUGHS)),
]
ALL = CASES + ROUND2 + ROUND3 + ROUND4


def _one_layer(ws):
    d = ws / "m-1layer"
    if not d.exists():
        shutil.copytree(ws / "model", d)
        _edit_config(d, num_hidden_layers=1)


def test_the_trials_have_169_cases():
    assert (len(CASES), len(ROUND2), len(ROUND3), len(ROUND4)) == (105, 41, 12, 11)
    assert len({c.id for c in ALL}) == len(ALL)


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input_ends_cleanly(case, ws, capsys, monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)
    monkeypatch.chdir(ws)
    _one_layer(ws)
    if case.setup is not None:
        case.setup(ws)
    argv = case.argv(ws)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refusing an option value
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code} for {argv}\n{out}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    for fragment in case.expect:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    if case.fix:
        assert "Fix:" in err, err
    assert not (ws / "PWNED").exists()
