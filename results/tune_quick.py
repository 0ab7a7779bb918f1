"""Tabulate the settings search of results/tune_quick.sh: one row per configuration tried, scored on the tuning
split (the last HOLDOUT MNIST training images, never in the private set), never on the test set.

    python results/tune_quick.py            # writes results/tune_quick.md and prints it
"""

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
COMMAND = ("python train.py --preset quick --public synthdigits --stage finetune --data-root DATA "
           "--out runs/tune/{name} --noise-seed 0 --tune-holdout {holdout} {flags}")


def row(name):
    """One configuration's figures, or None while it has not been scored."""
    base = os.path.join(HERE, "tune_quick", name)
    if not os.path.exists(base + ".json"):
        return None
    ev, report = json.load(open(base + ".json")), json.load(open(base + ".privacy_report.json"))
    flags = open(base + ".flags").read().strip()
    seconds = int(open(base + ".seconds").read()) if os.path.exists(base + ".seconds") else None
    holdout = ev["n_real_test"]
    return dict(name=name, flags=flags, epsilon=report["epsilon"], sigma=report["sigma"], steps=report["steps"],
                expected_batch=report["expected_batch"], n_private=report["n_private"],
                finetune_minutes=None if seconds is None else round(seconds / 60, 1),
                tune_cnn_accuracy=ev["accuracy"]["cnn"]["test_accuracy"], n_synthetic=ev["n_synthetic"],
                holdout=holdout, command=COMMAND.format(name=name, holdout=holdout, flags=flags))


def main():
    names = sorted(os.path.basename(p)[:-len(".flags")] for p in glob.glob(os.path.join(HERE, "tune_quick", "*.flags")))
    rows = [r for r in map(row, names) if r]
    lines = ["| configuration | flags | T | sigma | epsilon | fine-tuning min | CNN acc. on tuning split |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["tune_cnn_accuracy"], reverse=True):
        lines.append(f"| {r['name']} | `{r['flags']}` | {r['steps']} | {r['sigma']:.3f} | {r['epsilon']:.2f} | "
                     f"{r['finetune_minutes']} | {100 * r['tune_cnn_accuracy']:.1f}% |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "tune_quick.md"), "w") as f:
        f.write(text)
    with open(os.path.join(HERE, "tune_quick.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
