"""Fronts: other client APIs served on the chat-completions path (the inbound mirror of
proxy.providers). OpenAI's Responses API (`responses`) and Anthropic's Messages API
(`messages`) are translated into chat completion requests on the way in and their answers,
streams and errors back on the way out (`base`: what they share); the engine never knows a
front was involved.
"""
