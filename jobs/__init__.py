"""Jobs compose library calls into the units of work the CLI runs: each is `run(config, store)`."""
