"""The model's pipeline stages, one module each, numbered in reading order: 0 audio -> 1 mel -> 2 encoder
(with attention) -> 3 adapter -> 4 decoder (with attention) -> 5 generate (offline greedy decoding) ->
6 tokenizer. Each module's docstring starts with its number; docs/architecture.md and docs/walkthrough.ipynb
use the same numbers."""
