"""The HTTP surface, on aiohttp: the OpenAI endpoints, admin, auth, the server runner,
the client's request parsed once, and the proxy's own errors in OpenAI's shape."""
