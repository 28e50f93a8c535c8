"""`pdctl bench`: a load generator for OpenAI-compatible servers, vllm bench serve's metrics, and A/B runs."""
