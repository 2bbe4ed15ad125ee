"""Inference: the decoding loop (generation, sampling, beam search), the continuous-batching engine, and the OpenAI
HTTP API in front of it (protocol, server, chat page)."""
