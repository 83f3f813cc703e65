"""docs/architecture.md's weight table is the loader's canonical_names table (real model's shapes); the stage
numbers agree across the stage modules' docstrings, the README, docs/architecture.md and the walkthrough."""

import ast
import re
from pathlib import Path

import nbformat

import voxtral_ref.stages

from voxtral_ref.checkpoint.weights import canonical_names
from voxtral_ref.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
STAGES_DIR = Path(voxtral_ref.stages.__file__).parent
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


def numbered(text, pattern):
    """{module: stage number} from every match of `pattern` (groups: number, module name)."""
    found = [(m, int(n)) for n, m in re.findall(pattern, text, re.M)]
    assert len(found) == len(dict(found)), found                  # no module numbered twice
    return dict(found)


def test_one_stage_numbering_everywhere():
    """Reading order 0..6, the same in the module docstrings (`Stage N:`), the stages package's docstring, the
    README's pipeline table, docs/architecture.md's and the walkthrough's section headings."""
    order = ["audio", "mel", "encoder", "adapter", "decoder", "generate", "tokenizer"]
    want = {m: n for n, m in enumerate(order)}
    docstrings = {}
    for f in STAGES_DIR.glob("*.py"):
        first = (ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))) or "").splitlines()[0]
        m = re.match(r"Stage (\d+): ", first)
        if m:
            docstrings[f.stem] = int(m.group(1))
    assert docstrings == want
    package = ast.get_docstring(ast.parse((STAGES_DIR / "__init__.py").read_text(encoding="utf-8")))
    assert numbered(package, r"(\d+) (\w+)") == want
    heading = r"^## (\d+)\. [^\n]*?`stages/(\w+)\.py`"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert numbered(readme, r"^\| (\d+)\. [^|]*\| `stages/(\w+)\.py`") == want
    assert numbered(DOC.read_text(encoding="utf-8"), heading) == want
    notebook = nbformat.read(ROOT / "docs" / "walkthrough.ipynb", as_version=4)
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    assert numbered(markdown, heading) == want


def test_sources_of_truth_are_linked():
    links = ("https://huggingface.co/mistralai/Voxtral-Mini-4B-Realtime-2602",
             "https://github.com/huggingface/transformers/", "https://github.com/vllm-project/vllm/")
    notebook = (ROOT / "docs" / "walkthrough.ipynb").read_text(encoding="utf-8")
    for text in ((ROOT / "README.md").read_text(encoding="utf-8"), DOC.read_text(encoding="utf-8"), notebook):
        assert all(link in text for link in links)
