"""The quickstart pipeline end to end on a very small budget (the real run is `make quickstart`)."""

import json

from posttrain.config import load_config
from posttrain.quickstart import QuickstartConfig, run_quickstart


def test_quickstart_small(tmp_path):
    lines = []
    cfg = load_config(QuickstartConfig, None, [
        f"output_dir={tmp_path}", "train_examples=64", "eval_problems=8", "curve_points=1", "curve_problems=4",
        "max_new_tokens=24", "sft.train.max_steps=4", "sft.train.progress=false",
    ])
    summary = run_quickstart(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "held-out accuracy" in text and "format compliance" in text
    for name in ("summary.json", "samples.jsonl", "learning_curves.png", "sft/metrics.jsonl", "sft/final/config.json",
                 "data/sft_train.jsonl", "data/problems_heldout.jsonl"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["sft_steps"] == 4 == summary["sft_steps"]
    assert [c[0] for c in saved["learning_curve"]] == [0, 2, 4]
    assert 0.0 <= saved["sft"]["accuracy"] <= 1.0
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 8
