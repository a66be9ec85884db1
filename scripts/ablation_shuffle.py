#!/usr/bin/env python
"""The paper's Table 5 on the Brown LM: group LSTM with and without representation rearrangement, K = 2 and 4.

"Without" is Kuchaiev and Ginsburg's G-LSTM (``--no-shuffle-layers --no-shuffle-time``), "with" the paper's
group LSTM (both shuffles). Each of the four runs trains group_lstm_lm_brown on the Brown corpus
(scripts/prepare-brown.sh) with the same data, seed and budget as scripts/designs_report.py's LM rows (the
same runs: a run already done by one script is reused by the other), then scores validation and test
perplexity with fairseq-eval-lm. Writes Table 5's layout, test perplexity without | with (improvement =
(without - with) / without, as the paper computes it), plus a table of every run, as markdown and JSON:

    python scripts/ablation_shuffle.py [--updates 1500] [--groups 2 4] [--out docs/ablation-shuffle]

The paper's numbers (PTB, 2 x 1500, its own training schedule): K=2 82.5 | 78.6 (+4.7%), K=4 86.6 | 82.6 (+4.6%).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from designs_report import lm_group_row, lm_run, table  # noqa: E402

PAPER_TABLE5 = {2: (82.5, 78.6), 4: (86.6, 82.6)}  # PTB test perplexity without / with rearrangement


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-data", default="data/brown/data-bin")
    p.add_argument("--groups", nargs="+", type=int, default=[2, 4])
    p.add_argument("--updates", default="1500", help="updates per run (examples/brown-lm.sh's budget)")
    p.add_argument("--validate-every", default="500")
    p.add_argument("--save-root", default="checkpoints/designs", help="shared with scripts/designs_report.py")
    p.add_argument("--out", default="docs/ablation-shuffle")
    args = p.parse_args(argv)
    start = time.time()
    runs, table5 = [], []
    for K in args.groups:
        pair = {}
        for rearrangement in (False, True):
            row = lm_group_row(K, rearrangement)
            result = lm_run(row, args.lm_data, args.updates, args.save_root, args.validate_every)
            result.update(groups=K, rearrangement=rearrangement)
            runs.append(result)
            pair[rearrangement] = result["test_ppl"]
        without, with_ = pair[False], pair[True]
        table5.append({"groups": K, "without": without, "with": with_, "improvement": (without - with_) / without,
                       "paper": PAPER_TABLE5.get(K)})  # fmt: skip

    lines = [
        f"Test perplexity on Brown, group_lstm_lm_brown, {args.updates} updates per run (paper: PTB, Table 5)",
        "",
        "| Group | without | with (improvement) | paper: without | paper: with (improvement) |",
        "|---|---|---|---|---|",
    ]
    for r in table5:
        paper = r["paper"]
        paper_cells = "| |" if paper is None else f"| {paper[0]} | {paper[1]} (+{(paper[0] - paper[1]) / paper[0]:.1%}) |"
        lines.append(f"| {r['groups']} | {r['without']:.1f} | {r['with']:.1f} ({r['improvement']:+.1%}) {paper_cells}")
    lines += ["", "Every run:", ""] + table(runs)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "table5": table5, "runs": runs}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}.md and {args.out}.json; the ablation took {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
