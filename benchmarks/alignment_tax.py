"""The alignment tax on the tiny world, and how merging trades it (reference note 001 section 11).

    python benchmarks/alignment_tax.py --sft runs/quickstart/sft/final      # after make quickstart; ~4 min

The base model solves problems in its own pre-training layout ("Problem: ...\\nSolution:") but
not in chat; the SFT model is the reverse. For alpha in [0, 1] this merges base (alpha = 0) and
SFT (alpha = 1) three ways with ``posttrain merge``:

- WiSE-FT: linear, weights (1 - alpha, alpha);
- SLERP: t = alpha;
- TIES with the base as base_model and the SFT model at weight alpha, density 0.5,
  normalize false (with one fine-tuned model, normalize would cancel the weight);

and measures both abilities on the same 200 held-out problems (greedy): accuracy with the
textbook prompt and with the chat prompt. Writes ``<out>/alignment_tax.json`` and
``<out>/alignment_tax.png`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="builtin:tiny-world-base")
    ap.add_argument("--sft", required=True)
    ap.add_argument("--out", default="runs/alignment-tax")
    ap.add_argument("--alphas", default="0,0.2,0.4,0.5,0.6,0.8,1")
    ap.add_argument("--methods", default="wise_ft,slerp,ties")
    ap.add_argument("--problems", type=int, default=200)
    args = ap.parse_args(argv)

    from posttrain.merge import parse_merge_config, run_merge
    from posttrain.models.loading import load_causal_lm, load_tokenizer, locate
    from posttrain.world.evaluate import evaluate_problems
    from posttrain.world.tasks import generate_problems

    base = locate(args.base).path
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.sft)
    problems = generate_problems(args.problems, seed=0, split="heldout")
    textbook = [tok(f"Problem: {p.question}\nSolution:")["input_ids"] for p in problems]

    def measure(model_dir) -> dict:
        model = load_causal_lm(str(model_dir), device="cpu")
        as_text = evaluate_problems(model, tok, problems, prompts=textbook)
        as_chat = evaluate_problems(model, tok, problems)
        return {"textbook": as_text.accuracy, "chat": as_chat.accuracy}

    def config(method: str, alpha: float) -> dict:
        if method == "wise_ft":
            return {"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 1 - alpha}},
                                                         {"model": args.sft, "parameters": {"weight": alpha}}]}
        if method == "slerp":
            return {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": args.sft}],
                    "parameters": {"t": alpha}}
        return {"merge_method": "ties", "base_model": base,
                "models": [{"model": args.sft, "parameters": {"weight": alpha, "density": 0.5}}],
                "parameters": {"normalize": False}}

    rows = []
    t0 = time.time()
    for method in args.methods.split(","):
        for alpha in [float(a) for a in args.alphas.split(",")]:
            if method == "wise_ft" and alpha in (0.0, 1.0):
                model_dir = base if alpha == 0.0 else args.sft  # the endpoints themselves
            else:
                if alpha == 0.0 and method == "ties":
                    model_dir = base
                else:
                    model_dir = run_merge(parse_merge_config(config(method, alpha)), out / "merged", overwrite=True,
                                          log=lambda s: None)
            r = {"method": method, "alpha": alpha, **measure(model_dir)}
            rows.append(r)
            print(f"{method:8s} alpha={alpha:.2f}: textbook {100 * r['textbook']:5.1f}%  chat {100 * r['chat']:5.1f}%",
                  flush=True)
    (out / "alignment_tax.json").write_text(json.dumps({"rows": rows, "seconds": time.time() - t0}, indent=2) + "\n")
    plot(rows, out / "alignment_tax.png")
    print("\n| alpha | " + " | ".join(f"{m} textbook | {m} chat" for m in args.methods.split(",")) + " |")
    print("|---:|" + "---:|---:|" * len(args.methods.split(",")))
    for alpha in [float(a) for a in args.alphas.split(",")]:
        cells = []
        for m in args.methods.split(","):
            r = next(x for x in rows if x["method"] == m and x["alpha"] == alpha)
            cells += [f"{100 * r['textbook']:.1f}%", f"{100 * r['chat']:.1f}%"]
        print(f"| {alpha:.1f} | " + " | ".join(cells) + " |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"wise_ft": "tab:blue", "slerp": "tab:orange", "ties": "tab:green"}
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == m]
        a = [r["alpha"] for r in pts]
        ax.plot(a, [100 * r["chat"] for r in pts], "-o", color=colors.get(m), label=f"{m}: chat prompt")
        ax.plot(a, [100 * r["textbook"] for r in pts], "--s", color=colors.get(m), label=f"{m}: textbook prompt")
        bx.plot([100 * r["textbook"] for r in pts], [100 * r["chat"] for r in pts], "-o", color=colors.get(m), label=m)
    ax.set_xlabel("alpha (0 = base model, 1 = SFT model)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    bx.set_xlabel("textbook-prompt accuracy (%) [the base model's ability]")
    bx.set_ylabel("chat-prompt accuracy (%) [the aligned ability]")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    bx.set_title("trade-off curve")
    fig.suptitle("Alignment tax on the tiny world: merging base and SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
