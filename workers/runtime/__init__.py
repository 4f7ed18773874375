"""What every role runs on: the consumer loop, the runner that starts roles in one process,
the outcomes a handler returns, campaign control, health, metrics and logging."""
