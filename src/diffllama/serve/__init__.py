"""``diffllama serve``: an OpenAI-compatible HTTP server over a continuous-batching engine.

:mod:`~diffllama.serve.engine` schedules requests into the KV-cache slots of one model; :mod:`~diffllama.serve.api`
is the FastAPI app (OpenAI's /v1/completions, /v1/chat/completions, /v1/models, plus /health and /metrics);
:mod:`~diffllama.serve.metrics` writes Prometheus' text format. FastAPI, uvicorn and pydantic come with the
``serve`` extra (``pip install 'diffllama[serve]'``).
"""

from diffllama.serve.engine import Engine, Output, QueueFull, Request, SamplingParams

__all__ = ["Engine", "Output", "QueueFull", "Request", "SamplingParams"]
