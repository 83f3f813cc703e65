"""Shared fixtures: the tiny golden checkpoints (both on-disk formats) and the golden cases made by
golden/make_golden.py from the HF transformers oracle."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import voxtral_ref

GOLDEN = Path(os.environ.get("VOXTRAL_REF_GOLDEN", Path(__file__).resolve().parent.parent / "golden"))
MODEL_DIRS = {"mistral": GOLDEN / "models" / "tiny_mistral", "hf": GOLDEN / "models" / "tiny_hf"}


def golden_cases():
    """[(name, metadata)] from golden/cases/index.json."""
    index = GOLDEN / "cases" / "index.json"
    if not index.exists():
        return []
    return sorted((c["name"], c) for c in json.loads(index.read_text())["cases"])


def load_case(name):
    with np.load(GOLDEN / "cases" / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session", params=["mistral", "hf"])
def tiny_model(request):
    """The tiny random checkpoint in each format, NumPy backend."""
    return voxtral_ref.load(MODEL_DIRS[request.param], backend="numpy")


@pytest.fixture(scope="session")
def tiny_mistral():
    return voxtral_ref.load(MODEL_DIRS["mistral"], backend="numpy")
