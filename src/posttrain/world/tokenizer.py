"""Training the tiny world's tokenizer with the ``tokenizers`` library.

A byte-level BPE (so any text encodes, nothing is unknown) whose pre-tokenizer splits every
digit into its own token (arithmetic on digit tokens is far easier for a small model), saved
as a Hugging Face fast tokenizer with a ChatML-style chat template that carries
``{% generation %}`` markers around each assistant reply and its end-of-turn token.

The template also renders tools (the Hugging Face convention: ``tools=`` schemas, assistant
``tool_calls``, ``tool`` messages) compactly, for a model of 512 positions::

    <|im_start|>system
    tools: calculator(expression)<|im_end|>
    <|im_start|>user
    Mia has 14 shells. She finds 9 more. How many shells does Mia have now?<|im_end|>
    <|im_start|>assistant
    <tool_call>calculator(expression="14 + 9")</tool_call><|im_end|>
    <|im_start|>tool
    23<|im_end|>
    <|im_start|>assistant
    #### 23<|im_end|>

Each call is ``name(key=<value as JSON>, ...)``, which :func:`posttrain.envs.tools.parse_pythonic`
reads back; the generation block covers the calls and ``<|im_end|>``, so they are trained like
any reply, and tool results are not. Conversations without tools render exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]

CHAT_TEMPLATE = (
    # With ``tools``: one compact system block naming each tool and its parameters
    # (``tools: calculator(expression)``); a leading system message is merged into it (its text, a
    # newline, then the tools line). Without tools the output is byte-identical to the template the
    # assets were trained with (tests/test_world_template.py keeps that one as the reference).
    "{%- if tools %}"
    "{%- set ns = namespace(line='tools: ') %}"
    "{%- for tool in tools %}"
    "{%- set fn = tool['function'] if tool['function'] is defined else tool %}"
    "{%- set params = fn['parameters']['properties'] if fn['parameters'] is defined and "
    "fn['parameters']['properties'] is defined else {} %}"
    "{%- set ns.line = ns.line + fn['name'] + '(' + (params | list | join(', ')) + ')' + (', ' if not loop.last else '') %}"
    "{%- endfor %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '\\n' + ns.line + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n' + ns.line + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}"
    # An assistant turn with tool calls: its text (if any) and a newline, then one
    # <tool_call>name(key=<JSON value>, ...)</tool_call> per call (posttrain.envs.tools.parse_pythonic).
    "{%- if message['tool_calls'] %}"
    "{{- message['content'] + '\\n' if message['content'] else '' }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if fn['arguments'] is string %}"
    "{{- raise_exception('tool call arguments must be an object (a dict), not a JSON string') }}"
    "{%- endif %}"
    "{{- '<tool_call>' + fn['name'] + '(' }}"
    "{%- for key, value in fn['arguments'] | items %}{{- key + '=' + value | tojson }}{{- ', ' if not loop.last }}"
    "{%- endfor %}"
    "{{- ')</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the world tokenizer on ``texts``; the returned tokenizer has the chat template set."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[ENDOFTEXT, IM_START],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
