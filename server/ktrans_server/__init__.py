"""ktrans's HTTP server: OpenAI- and Ollama-compatible APIs over the continuous-batching engine.

Installed as the package `ktrans_server` (a name no other project uses); started by
`ktrans serve` or `python server/main.py`.
"""
