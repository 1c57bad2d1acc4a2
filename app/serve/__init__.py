"""`malhae serve`: the runtime's continuous-batching scheduler behind OpenAI's and Ollama's HTTP APIs.

Built on the runtime layer only (engine, batching, templates, settings); the CLI parses flags and calls `server.run`.
The web stack (Starlette on uvicorn) is the optional `serve` extra, imported only here.
"""
