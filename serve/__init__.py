"""The HTTP face: the OpenAI protocol, the Ray Serve deployments and app builder, the async engine bridge."""
