"""The study behind ``sparsesam reproduce``: the three papers' comparisons and ablations, over seeds.

* :mod:`~sparsesam.study.plan`: the comparisons, their methods, budgets and protocols;
* :mod:`~sparsesam.study.dense`: each seed's dense starting models, trained to a plateau;
* :mod:`~sparsesam.study.run`: the tasks, run in order or in worker processes, resumable;
* :mod:`~sparsesam.study.report`: per-seed runs aggregated into RESULTS.md, results.json and figures.

It uses the library (training, pruning runs, evaluation, model files) and
never the CLI's modules; the CLI's ``reproduce`` command holds only the
flags and the call to :func:`~sparsesam.study.run.run_study`. The
subpackage is imported on use (``import sparsesam.study.run``), so
importing ``sparsesam`` does not load it.
"""
