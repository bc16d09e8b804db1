"""Attention (sequence-length sweep, non-causal and causal) benchmark.

    python benchmarks/bench_attention.py [--quick] [--device cuda|cpu] [--out DIR] [...]

is ``fastattn bench attention ...``; the suite lives in ``fastattn/bench/attention.py`` so the installed
command can run it. ``--help`` lists every option.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["attention", *sys.argv[1:]]))
