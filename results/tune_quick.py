"""Tabulate the settings search of results/tune_quick.sh: one row per configuration tried, scored on the tuning
split (the last HOLDOUT MNIST training images, never in the private set), never on the test set.

    python results/tune_quick.py            # writes results/tune_quick.md and prints it
    python results/tune_quick.py synthsvhn  # PUBLIC_SET=synthsvhn's search: results/tune_synthsvhn.md
    python results/tune_quick.py synthsvhn_p6k  # and synthsvhn_p9k

The configuration `public` is the public stages alone (no fine-tuning): the public-only row on the tuning split.
"""

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# PUBLIC_SET -> (results name, run folders, the public stages' flags) as in results/tune_quick.sh
SEARCHES = {"synthdigits": ("tune_quick", "runs/tune", "--public synthdigits"),
            "synthsvhn": ("tune_synthsvhn", "runs/tune_synthsvhn", "--public synthsvhn"),
            "synthsvhn_p6k": ("tune_synthsvhn_p6k", "runs/tune_synthsvhn_p6k",
                              "--public synthsvhn --pretrain-steps 6000"),
            "synthsvhn_p9k": ("tune_synthsvhn_p9k", "runs/tune_synthsvhn_p9k",
                              "--public synthsvhn --pretrain-steps 9000")}
COMMAND = ("python train.py --preset quick {public_flags} --stage finetune --data-root DATA "
           "--out {runs}/{name} --noise-seed 0 --tune-holdout {holdout} {flags}")
PUBLIC_COMMAND = "PUBLIC_SET={public} bash results/tune_quick.sh DATA public  # samples its pretrain.pt"


def row(public, name):
    """One configuration's figures, or None while it has not been scored."""
    results, runs, public_flags = SEARCHES[public]
    base = os.path.join(HERE, results, name)
    if not os.path.exists(base + ".json"):
        return None
    ev = json.load(open(base + ".json"))
    report = json.load(open(base + ".privacy_report.json")) if name != "public" else dict.fromkeys(
        ("epsilon", "sigma", "steps", "expected_batch", "n_private"))
    flags = open(base + ".flags").read().strip()
    seconds = int(open(base + ".seconds").read()) if os.path.exists(base + ".seconds") else None
    holdout = ev["n_real_test"]
    return dict(name=name, flags=flags, epsilon=report["epsilon"], sigma=report["sigma"], steps=report["steps"],
                expected_batch=report["expected_batch"], n_private=report["n_private"],
                finetune_minutes=None if seconds is None else round(seconds / 60, 1),
                tune_cnn_accuracy=ev["accuracy"]["cnn"]["test_accuracy"],
                synthetic_val_cnn_accuracy=ev["accuracy"]["cnn"]["val_accuracy_synthetic"],
                n_synthetic=ev["n_synthetic"], holdout=holdout,
                command=PUBLIC_COMMAND.format(public=public) if name == "public" else COMMAND.format(
                    public_flags=public_flags, runs=runs, name=name, holdout=holdout, flags=flags))


def main(public="synthdigits"):
    if public not in SEARCHES:
        sys.exit(f"error: public set {public!r} is not allowed; allowed: {', '.join(SEARCHES)}")
    results = SEARCHES[public][0]
    names = sorted(os.path.basename(p)[:-len(".flags")] for p in glob.glob(os.path.join(HERE, results, "*.flags")))
    rows = [r for r in (row(public, name) for name in names) if r]
    lines = ["| configuration | flags | T | sigma | epsilon | fine-tuning min | CNN acc. on tuning split "
             "| CNN on synthetic val |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["tune_cnn_accuracy"], reverse=True):
        dp = ("-", "-", "-") if r["steps"] is None else (r["steps"], f"{r['sigma']:.3f}", f"{r['epsilon']:.2f}")
        lines.append(f"| {r['name']} | `{r['flags'] or 'no fine-tuning'}` | {' | '.join(map(str, dp))} | "
                     f"{r['finetune_minutes'] or '-'} | {100 * r['tune_cnn_accuracy']:.1f}% "
                     f"| {100 * r['synthetic_val_cnn_accuracy']:.1f}% |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, results + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(HERE, results + ".json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:2])
