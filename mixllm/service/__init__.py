"""The BentoML service (`app.py`, `bentoml serve mixllm.service.app:MixLLMService`) and its parts:
request models and the OpenAPI contract, middleware, the OpenAI-compatible proxy with failover and
circuit breakers, spend records, the served model's lifecycle and local copy, shadow scoring,
batching of concurrent calls and the live traffic the latency penalty sees.

This `__init__` imports nothing, so importing one part does not start the whole app.
"""
