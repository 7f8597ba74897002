"""Shared fixtures. Fixtures of the data layer's tests are prefixed ``data_``; the session-scoped
tokenizers are shared, so tests must not modify them (build a fresh one with
``data_make_tokenizer`` instead)."""

from __future__ import annotations

import os
import random
import tempfile

import pytest

# the tokenization cache of every run in the suite goes to a fresh directory, not ~/.cache
os.environ.setdefault("POSTTRAIN_CACHE", tempfile.mkdtemp(prefix="posttrain-test-cache-"))

# ----------------------------------------------------------------------------------------
# Offline tokenizers for the data-layer tests: a byte-level BPE trained on a few hundred
# strings, wrapped in PreTrainedTokenizerFast, with chat templates written here.
# ----------------------------------------------------------------------------------------

DATA_CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DATA_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML. Literal newlines after block tags would be eaten by jinja's trim_blocks, hence {{ '\n' }}.
DATA_CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DATA_CHATML_TEMPLATE_MARKED = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: BOS rendered by the template, role headers, trimmed content, <|eot_id|>.
DATA_LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DATA_LLAMA3_TEMPLATE_MARKED = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ (m['content'] | trim) + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ (m['content'] | trim) + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_WORDS = (
    "the a cat dog runs jumps over lazy quick brown fox hello world what is two plus three four "
    "five six answer question you are helpful assistant user system please think step by step "
    "sum of and then it 1 2 3 4 5 6 7 8 9 10 = + ? ! , ."
).split()


def _data_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 16))) for _ in range(n)]


def _data_train_bpe(specials: list[str], *, bos: str | None = None, trim_offsets: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_data_corpus(), trainer)
    post = [processors.ByteLevel(trim_offsets=trim_offsets)]
    if bos is not None:
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
            )
        )
    tk.post_processor = processors.Sequence(post)
    return tk


def data_build_tokenizer(style: str = "chatml", template: str | None = "default", *, trim_offsets: bool = False):
    """A fresh PreTrainedTokenizerFast; ``template="default"`` picks the style's plain template."""
    from transformers import PreTrainedTokenizerFast

    if style == "chatml":
        raw = _data_train_bpe(DATA_CHATML_SPECIALS, trim_offsets=trim_offsets)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>"],
        )
        default = DATA_CHATML_TEMPLATE
    elif style == "llama3":
        raw = _data_train_bpe(DATA_LLAMA3_SPECIALS, bos="<|begin_of_text|>", trim_offsets=trim_offsets)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
        )
        default = DATA_LLAMA3_TEMPLATE
    else:
        raise ValueError(style)
    tok.chat_template = default if template == "default" else template
    return tok


@pytest.fixture(scope="session")
def data_make_tokenizer():
    """Factory: ``data_make_tokenizer(style="chatml"|"llama3", template="default"|str|None)``."""
    return data_build_tokenizer


@pytest.fixture(scope="session")
def data_chatml_tokenizer():
    return data_build_tokenizer("chatml")


@pytest.fixture(scope="session")
def data_chatml_marked_tokenizer():
    return data_build_tokenizer("chatml", DATA_CHATML_TEMPLATE_MARKED)


@pytest.fixture(scope="session")
def data_llama3_tokenizer():
    return data_build_tokenizer("llama3")


@pytest.fixture(scope="session")
def data_llama3_marked_tokenizer():
    return data_build_tokenizer("llama3", DATA_LLAMA3_TEMPLATE_MARKED)


@pytest.fixture(scope="session")
def data_templates():
    """The chat templates by name (for tests that build their own variants)."""
    return {
        "chatml": DATA_CHATML_TEMPLATE,
        "chatml_marked": DATA_CHATML_TEMPLATE_MARKED,
        "llama3": DATA_LLAMA3_TEMPLATE,
        "llama3_marked": DATA_LLAMA3_TEMPLATE_MARKED,
    }


# ----------------------------------------------------------------------------------------
# Tiny random causal LMs saved as model directories (with the world tokenizer), per test module
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """``{"llama": dir, "qwen2": dir}``: tiny random models the command line can load."""
    from .tiny import tiny_model, world_tokenizer

    dirs = {}
    for arch in ("llama", "qwen2"):
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        tiny_model(arch, hidden=32).save_pretrained(d)
        world_tokenizer().save_pretrained(d)
        dirs[arch] = d
    return dirs
