"""docs/architecture.md's weight table is the loader's canonical_names table (real model's shapes)."""

import re
from pathlib import Path

from voxtral_ref.checkpoint.weights import canonical_names
from voxtral_ref.config import ModelConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
M = "mm_streams_embeddings.embedding_module."


def doc_rows():
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = re.findall(r"`([^`]*)`", line)
        if line.startswith("| `") and len(cells) >= 4:
            canon, mistral, hf, shape = cells[:4]
            mistral = re.sub(r"^W\.", M + "whisper_encoder.", re.sub(r"^M\.", M, mistral))
            rows.append((canon, mistral, hf, tuple(int(x) for x in shape.strip("[]").split(", "))))
    return rows


def test_weight_table_matches_the_loader():
    cfg = ModelConfig()
    layers = {"enc": cfg.encoder.n_layers, "dec": cfg.decoder.n_layers}
    expanded = [tuple(c.replace("{i}", str(i)) if isinstance(c, str) else c for c in row)
                for row in doc_rows()
                for i in (range(layers[row[0][:3]]) if "{i}" in row[0] else [0])]
    assert sorted(expanded) == sorted(canonical_names(cfg))


def test_notes_name_every_bias_and_the_rope_rows():
    notes = {row[0]: line for row in doc_rows() for line in DOC.read_text().splitlines() if f"| `{row[0]}` |" in line}
    for canon, line in notes.items():
        last = canon.split(".")[-1]
        assert ("bias" in line.split("|")[-2]) == (last in ("bq", "bv", "bo", "b2", "bias")), canon
        assert ("RoPE" in line) == (last in ("wq", "wk", "bq")), canon
