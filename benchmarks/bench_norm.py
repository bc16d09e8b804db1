"""Residual add + LayerNorm / RMSNorm (hidden-size sweep) benchmark.

    python benchmarks/bench_norm.py [--quick] [--device cuda|cpu] [--out DIR] [...]

is ``fastattn bench norm ...``; the suite lives in ``fastattn/bench/norm.py`` so the installed
command can run it. ``--help`` lists every option.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["norm", *sys.argv[1:]]))
