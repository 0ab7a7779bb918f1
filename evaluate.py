"""The evaluation command line: `python evaluate.py ...` runs `python -m ldm.evaluate ...` (ldm/evaluate.py), which
says what it measures; `python evaluate.py --help` lists the flags."""

from ldm.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
