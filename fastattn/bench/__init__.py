"""fastattn's benchmarks: ``fastattn bench`` (:func:`main`), one suite per op plus the model.

Layout: :mod:`~fastattn.bench.harness` (providers, correctness gate, timers, memory, rows),
:mod:`~fastattn.bench.runner` (running a suite), one module per suite (``attention``,
``norm``, ``ffn``, ``model``, ``decode``), :mod:`~fastattn.bench.report` (JSON, CSV, markdown, plots),
:mod:`~fastattn.bench.cli` (the command). Nothing here runs or imports a GPU library on import.
"""

from fastattn.bench.cli import main

__all__ = ["main"]
