"""Everything that runs on Ray: actor pools, schedulers, job submission, the CLI."""
