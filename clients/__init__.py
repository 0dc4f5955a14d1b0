"""What talks to the service or drives the pipeline: the CLI, (later) the client and locust file."""
