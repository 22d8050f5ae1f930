"""The `vismmoe` console script: `app` holds the subcommands, `args` the argument plumbing they share."""
