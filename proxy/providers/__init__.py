"""Talking to model servers: the upstream transport, and what each kind of server
(OpenAI-compatible, llama.cpp, Ollama, Anthropic) does its own way."""
