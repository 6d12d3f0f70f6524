"""The ``sparsesam`` command's subcommands, one module each (train, prune, eval, report, demo)."""
