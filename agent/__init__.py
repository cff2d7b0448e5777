"""The machine side of prompt jobs: the entrypoint that runs Claude Code inside a Fly machine."""
