"""The HTTP and websocket edge: routes, envelopes, request parsing, authentication, uvicorn."""
