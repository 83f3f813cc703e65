"""The model's pipeline stages, one module each, in reading order: audio -> mel -> encoder (with attention)
-> adapter -> decoder -> generate (offline greedy decoding) -> tokenizer."""
