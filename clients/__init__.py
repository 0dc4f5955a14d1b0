"""What talks to the service or drives the pipeline: the CLI, the HTTP client (:mod:`clients.client`),
(later) the locust file."""
