"""A local language model in JAX for the `llm` controller: a Llama-family decoder read from a
GGUF file (`gguf_model`), its forward pass with a KV cache (`decoder`), and constrained
decoding of architecture proposals (`proposer`). Needs the `llm` extra."""
