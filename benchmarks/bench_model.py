"""End-to-end reference Transformer, fused vs naive (sequence-length sweep) benchmark.

    python benchmarks/bench_model.py [--quick] [--device cuda|cpu] [--out DIR] [...]

is ``fastattn bench model ...``; the suite lives in ``fastattn/bench/model.py`` so the installed
command can run it. ``--help`` lists every option.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["model", *sys.argv[1:]]))
