"""Build the tiny world's tokenizer and pre-train its base model from scratch.

    python -m posttrain.world.build --out src/posttrain/world/assets/tiny-world-base

Steps (all seeded, so the run is reproducible on the same torch build and thread count):

1. generate the raw-text corpus (:mod:`posttrain.world.corpus`; train split only);
2. train a byte-level BPE tokenizer on it (plus chat-rendered examples, so the chat
   vocabulary exists as tokens, as in any real tokenizer);
3. pre-train a small Llama (GQA, RMSNorm, tied embeddings) on the corpus, documents joined
   by ``<|endoftext|>`` and cut into fixed-length rows (plain pre-training: no masking);
4. save model, tokenizer and generation config as a Hugging Face directory, plus
   ``world_build.json`` with the settings, run time and probe accuracies.

The shipped model was built with the defaults below; its run time and numbers are in
``world_build.json`` next to the weights and in the README. The distillation student
(``builtin:tiny-world-student``, ~1M parameters) shares the base model's tokenizer:

    python -m posttrain.world.build --out src/posttrain/world/assets/tiny-world-student \
        --size student --tokenizer builtin:tiny-world-base
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from ..errors import ConfigError
from ..train.optim import build_optimizer, build_scheduler
from ..models.loading import load_tokenizer
from ..train.rundir import check_output_dir
from .corpus import corpus_documents
from .evaluate import evaluate_problems
from .tasks import generate_problems
from .tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, train_tokenizer


#: architectures: the base model (4.3M parameters) and the distillation student (~1M)
SIZES = {
    "base": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=2),
    "student": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=5, num_attention_heads=4,
                    num_key_value_heads=2),
}


def model_config(vocab_size: int, tokenizer, size: str = "base") -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        **SIZES[size],
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
    )


def _chat_samples(n: int, seed: int) -> list[str]:
    from jinja2 import Template

    template = Template(CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    return [
        template.render(messages=p.messages(), add_generation_prompt=False)
        for p in generate_problems(n, seed=seed + 17, split="train")
    ]


def build(args: argparse.Namespace) -> dict:
    t0 = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs = corpus_documents(args.docs, seed=args.seed)
    if args.tokenizer:   # share an existing model's tokenizer (the student shares the base model's)
        tokenizer = load_tokenizer(args.tokenizer, key="--tokenizer")
    else:
        tokenizer = train_tokenizer(docs[:20000] + _chat_samples(2000, args.seed), vocab_size=args.vocab_size)
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    sep = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(sep)
    n_rows = len(stream) // args.seq_len
    data = torch.tensor(stream[: n_rows * args.seq_len], dtype=torch.long).view(n_rows, args.seq_len)
    total_steps = args.epochs * (n_rows // args.batch_size)
    if total_steps == 0:
        raise ConfigError(
            f"The corpus has {n_rows} rows of --seq-len {args.seq_len} tokens, fewer than one batch of --batch-size "
            f"{args.batch_size}, so there is nothing to train.",
            fix="raise --docs, or lower --batch-size or --seq-len.")
    print(f"corpus: {len(docs)} docs, {len(stream)} tokens, {n_rows} rows of {args.seq_len}; "
          f"vocab {len(tokenizer)} (embedding {vocab}); {total_steps} steps")

    config = model_config(vocab, tokenizer, args.size)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    optimizer = build_optimizer(model, lr=args.lr, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=args.warmup,
                                min_lr_ratio=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    step = 0
    losses: list[float] = []
    bar = tqdm(total=total_steps, desc="pre-training", unit="step")
    for _ in range(args.epochs):
        perm = torch.randperm(n_rows, generator=gen)
        for b in range(n_rows // args.batch_size):
            rows = data[perm[b * args.batch_size : (b + 1) * args.batch_size]]
            loss = model(input_ids=rows, labels=rows, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    bar.close()
    train_seconds = time.time() - t0

    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), sep],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    probe = generate_problems(args.probe_problems, seed=0, split="heldout")
    text_prompts = [tokenizer(f"Problem: {p.question}\nSolution:")["input_ids"] for p in probe]
    as_text = evaluate_problems(model, tokenizer, probe, prompts=text_prompts)
    as_chat = evaluate_problems(model, tokenizer, probe)
    report = {
        "seed": args.seed, "size": args.size, "tokenizer": args.tokenizer or "trained", "docs": args.docs, "tokens": len(stream), "epochs": args.epochs,
        "steps": total_steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "lr": args.lr, "threads": args.threads, "parameters": n_params,
        "final_loss": sum(losses[-50:]) / min(50, len(losses)),
        "train_seconds": round(train_seconds, 1),
        "probe_heldout_textbook_prompt": as_text.metrics(),
        "probe_heldout_chat_prompt": as_chat.metrics(),
        "torch": torch.__version__,
    }
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "world_build.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "loss_curve.json").write_text(json.dumps([round(x, 4) for x in losses[::10]]) + "\n")
    print(json.dumps(report, indent=2))
    for s in as_text.samples[:3] + as_chat.samples[:3]:
        print(repr(s["question"]), "->", repr(s["response"]), s["correct"])
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="posttrain world build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory for the model and tokenizer")
    p.add_argument("--docs", type=int, default=120_000, help="corpus documents")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="base", choices=sorted(SIZES),
                   help="architecture: base (4.3M parameters) or student (~1M, for distillation)")
    p.add_argument("--tokenizer", default=None,
                   help="use this model's tokenizer instead of training one (e.g. builtin:tiny-world-base)")
    p.add_argument("--probe-problems", type=int, default=200, help="held-out problems for the final probe")
    p.add_argument("--overwrite", action="store_true", help="allow --out to be a non-empty directory that an "
                   "earlier build did not write")
    args = p.parse_args(argv)
    for name in ("docs", "epochs", "batch_size", "seq_len", "vocab_size", "threads", "probe_problems"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.vocab_size < 512:
        p.error(f"--vocab-size must be at least 512 (256 byte tokens, the special tokens and room for merges), "
                f"got {args.vocab_size}")
    if args.warmup < 0:
        p.error(f"--warmup must be 0 or more, got {args.warmup}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    check_output_dir(args.out, overwrite=True, key="--out")
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not (out / "world_build.json").is_file() and not args.overwrite:
        raise ConfigError(
            f"Option '--out' is '{out}', which holds files that an earlier `world build` did not write (no "
            "world_build.json); building there would replace its model.safetensors, config.json and tokenizer.",
            fix="choose an empty or new --out directory, or add --overwrite.")
    build(args)


if __name__ == "__main__":
    main()
