"""The engine: requests in, tokens out — scheduler, model runner, sampling, outputs (one process's view)."""
