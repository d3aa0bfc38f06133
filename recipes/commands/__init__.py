"""One module per ``r3`` subcommand; each defines ``add_arguments(parser)`` and ``run(args) -> int``."""
