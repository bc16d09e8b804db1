"""Feed-forward Linear-act-Linear (token sweep) benchmark.

    python benchmarks/bench_ffn.py [--quick] [--device cuda|cpu] [--out DIR] [...]

is ``fastattn bench ffn ...``; the suite lives in ``fastattn/bench/ffn.py`` so the installed
command can run it. ``--help`` lists every option.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["ffn", *sys.argv[1:]]))
