"""Adapters that produce text and vectors: the OpenAI-compatible chat client, its
response cache, the MiniLM ONNX embedder, local llama.cpp servers and the simulator."""
