"""The README, docs/*.md and configs/*.yaml name only commands, flags and config keys that exist.

* every ``posttrain <command>`` in a code block or an inline code span is a subcommand of the
  real parser (``world <sub>`` too); its ``--flags`` are options of that subcommand; its
  ``key=value`` overrides are keys of the command's config dataclass; a ``--config configs/...``
  file exists and loads with that dataclass (the project's own ``load_config``);
* every config key in backticks in the prose (``section.key``, ``section.key=value``,
  ``key=value``) is a key or section of some command's config, unless it is in
  :data:`NOT_CONFIG_KEYS` (with the reason);
* every ``configs/*.yaml`` loads with the config of the command its ``# Run:`` line names.

Keys are checked by name only (values in the docs are often placeholders: DIR, N, ...).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from posttrain.algorithms.cai import CAIConfig
from posttrain.algorithms.distill import DistillConfig
from posttrain.algorithms.dpo import DPOConfig
from posttrain.algorithms.evaluate import EvalConfig
from posttrain.algorithms.online_dpo import OnlineDPOConfig
from posttrain.algorithms.prm import PRMConfig
from posttrain.algorithms.rft import RFTConfig
from posttrain.algorithms.rl import PRESETS, RLConfig
from posttrain.algorithms.rm import RMConfig
from posttrain.algorithms.sft import SFTConfig
from posttrain.cli import build_parser
from posttrain.config import config_keys, load_config
from posttrain.quickstart import QuickstartConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# the config dataclass of every command that takes key=value overrides (what its _cmd_* loads)
COMMAND_CONFIGS: dict[str, type] = {
    "sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "rl": RLConfig, **{p: RLConfig for p in PRESETS},
    "rft": RFTConfig, "online-dpo": OnlineDPOConfig, "prm": PRMConfig, "cai": CAIConfig, "distill": DistillConfig,
    "quickstart": QuickstartConfig, "eval": EvalConfig,
}

# spans in backticks that look like config keys but are not, each with the reason
NOT_CONFIG_KEYS = {
    "key=value": "README: the placeholder of the override syntax",
    "trust_remote_code=False": "docs/security.md: a transformers keyword argument",
    "trust_remote_code=True": "docs/security.md: a transformers keyword argument",
    "use_cache=False": "a transformers keyword argument",
    "train.rundir": "the module posttrain.train.rundir",
    "train.rundir.acquire_run_lock": "a function of the module posttrain.train.rundir",
    "train.safestate": "the module posttrain.train.safestate",
    "train.checkpoint": "the module posttrain.train.checkpoint",
    "data.prefix.collate_shared_prefix": "a function of the module posttrain.data.prefix",
}

FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "yml", "png", "safetensors", "bin", "pt", "txt", "model",
                 "index", "parquet", "arrow"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


PARSER = build_parser()
COMMANDS = _subparsers(PARSER)
ALL_KEYS = {k for cls in set(COMMAND_CONFIGS.values()) for k in config_keys(cls)}


def _sections(keys) -> set[str]:
    return {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)}


def _is_key(key: str, keys: set[str]) -> bool:
    """A leaf key, a section (``model.peft``), or a section's wildcard (``model.peft.*``)."""
    key = key[:-2] if key.endswith(".*") else key
    return key in keys or key in _sections(keys)


def _doc_text(path: Path) -> tuple[list[tuple[int, str]], str]:
    """(the code blocks' lines with their line numbers, continuation lines joined; the prose with
    the code blocks blanked out)."""
    code, prose, in_code, pending = [], [], False, None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip().startswith("```"):
            in_code = not in_code
            prose.append("")
            continue
        if in_code:
            prose.append("")
            if pending is not None:
                pending = (pending[0], pending[1] + " " + line.strip())
            else:
                pending = (n, line.strip())
            if pending[1].endswith("\\"):
                pending = (pending[0], pending[1][:-1])
            else:
                code.append(pending)
                pending = None
        else:
            prose.append(line)
    return code, "\n".join(prose)


# a command line: `posttrain`, `.venv/bin/posttrain` or `python -m posttrain` / `torchrun ... -m posttrain`
# at its start (program output that mentions posttrain is not one)
COMMAND_RE = re.compile(r"^(?:\$\s*)?(?:(?:\S*/)?posttrain|\S*(?:python|torchrun|accelerate)\b.*?\s-m\s+posttrain)"
                        r"\s+([a-z][\w-]*)(.*)")


def _commands_in(text: str):
    """(command, the rest of the line) of a command line ``posttrain <command> ...``."""
    m = COMMAND_RE.match(text.strip())
    if m:
        yield m.group(1), m.group(2)


def _tokens(rest: str) -> list[str]:
    rest = rest.split("`")[0]  # an inline span ends at its backtick
    try:
        return shlex.split(rest, comments=True)
    except ValueError:  # an unbalanced quote in prose: split on spaces
        return rest.split("#")[0].split()


def _uses() -> list[tuple[str, str, str, list[str]]]:
    """(where, command, sub-command or '', tokens) of every command use in the docs."""
    out = []
    for path in DOCS:
        code, prose = _doc_text(path)
        for n, line in code:
            for cmd, rest in _commands_in(line):
                out.append((f"{path.name}:{n}", cmd, rest, _tokens(rest)))
        for span in re.findall(r"`([^`]+)`", prose):
            span = " ".join(span.split())
            if span.startswith("posttrain "):
                for cmd, rest in _commands_in(span):
                    out.append((f"{path.name}: `{span}`", cmd, rest, _tokens(rest)))
    return out


USES = _uses()


def test_the_docs_name_commands():
    assert len(USES) > 40, "the parser of the docs found too few posttrain commands"
    assert {"sft", "dpo", "rl", "quickstart", "plan", "merge"} <= {u[1] for u in USES}


def test_every_config_command_is_mapped_to_its_config():
    takes_overrides = {name for name, p in COMMANDS.items()
                       if any(a.dest == "overrides" for a in p._actions)}
    assert takes_overrides == set(COMMAND_CONFIGS)


@pytest.mark.parametrize("where,cmd,rest,tokens", USES, ids=[f"{u[0]} {u[1]}" for u in USES])
def test_doc_command_exists_with_its_flags_and_keys(where, cmd, rest, tokens):
    assert cmd in COMMANDS, f"{where}: `posttrain {cmd}` is not a command (commands: {sorted(COMMANDS)})"
    parser = COMMANDS[cmd]
    subs = _subparsers(parser)
    if subs and tokens and not tokens[0].startswith("-"):
        assert tokens[0] in subs, f"{where}: `posttrain {cmd} {tokens[0]}` is not a command"
        parser, tokens = subs[tokens[0]], tokens[1:]
        if not parser.add_help:  # (world build: its options are the builder's own)
            return
    flags = {s for a in parser._actions for s in a.option_strings}
    for tok in tokens:
        if tok.startswith("--"):
            flag = tok.split("=", 1)[0]
            assert flag in flags, f"{where}: `posttrain {cmd}` has no option {flag} (options: {sorted(flags)})"
    if cmd not in COMMAND_CONFIGS:
        return
    cls = COMMAND_CONFIGS[cmd]
    keys = set(config_keys(cls))
    overrides = [t for t in tokens if "=" in t and not t.startswith("-") and re.match(r"^[a-z_][\w.]*=", t)]
    for item in overrides:
        key = item.split("=", 1)[0]
        assert _is_key(key, keys), f"{where}: `posttrain {cmd}` has no config key {key!r}"
    configs = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--config"]
    for path in configs:
        if path.startswith("configs/"):
            assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
            load_config(cls, [str(ROOT / path)])


def _key_spans() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        _, prose = _doc_text(path)
        for span in re.findall(r"`([^`]+)`", prose):
            span = " ".join(span.split())
            dotted = re.fullmatch(r"([a-z_][a-z0-9_]*(?:\.(?:[a-z_][a-z0-9_]*|\*))+)(=.*)?", span)
            bare = re.fullmatch(r"([a-z_][a-z0-9_]*)=.*", span)
            if dotted:
                key = dotted.group(1)
                if key.rsplit(".", 1)[-1] in FILE_SUFFIXES or key.split(".")[-2:-1] == ["safetensors"]:
                    continue  # a file name
                if key.split(".")[0] not in _sections(ALL_KEYS) | ALL_KEYS:
                    continue  # a Python module or attribute (posttrain.ops, torch.load, ...)
                out.append((path.name, span))
            elif bare:
                out.append((path.name, span))
    return out


KEY_SPANS = _key_spans()


def test_the_docs_name_config_keys():
    assert len(KEY_SPANS) > 100


@pytest.mark.parametrize("doc,span", KEY_SPANS, ids=[f"{d}:{s}" for d, s in KEY_SPANS])
def test_doc_config_key_exists(doc, span):
    if span in NOT_CONFIG_KEYS:
        return
    key = span.split("=", 1)[0]
    assert _is_key(key, ALL_KEYS), (f"{doc}: `{span}` names no config key of any command (add it to "
                                    "NOT_CONFIG_KEYS with the reason if it is not meant as one)")


def test_not_config_keys_are_used_and_are_not_keys():
    spans = {s for _, s in KEY_SPANS}
    for span in NOT_CONFIG_KEYS:
        assert span in spans, f"NOT_CONFIG_KEYS has {span!r}, which no doc uses any more"
        assert not _is_key(span.split("=", 1)[0], ALL_KEYS)


CONFIG_FILES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_file_loads_with_its_command(path):
    run = re.search(r"^#\s*Run:\s*(.*)$", path.read_text(encoding="utf-8"), re.M)
    assert run, f"{path.name} has no '# Run: posttrain <command> ...' line"
    (cmd, rest), = _commands_in(run.group(1))
    tokens = _tokens(rest)
    assert cmd in COMMAND_CONFIGS, f"{path.name}: `posttrain {cmd}` takes no config"
    assert tokens[tokens.index("--config") + 1] == f"configs/{path.name}"
    overrides = [t for t in tokens if "=" in t and not t.startswith("-")]
    load_config(COMMAND_CONFIGS[cmd], [str(path)], overrides)


@pytest.mark.parametrize("command,unit", [("rl", "prompt groups"), ("dpo", "pairs"), ("sft", "rows")])
def test_micro_batch_size_help_says_what_the_command_batches(command, unit):
    """`posttrain <command> --help` and configs/<command>_tiny_world.yaml agree on what
    train.micro_batch_size counts (online RL takes prompt groups per forward pass, not rows)."""
    from posttrain.config import describe

    (line,) = [x for x in describe(COMMAND_CONFIGS[command]) if x.strip().startswith("train.micro_batch_size ")]
    clauses = [c for c in line.split(";") if re.search(rf"\b{command}\b", c.split(":")[-2] if ":" in c else "")]
    assert clauses and unit in clauses[0], line
    comment = re.search(r"micro_batch_size:.*#\s*(.*)", (ROOT / "configs" / f"{command}_tiny_world.yaml").read_text())
    assert comment is None or unit in comment.group(1), comment.group(1)
