"""The golden-tensor oracle: `voxtral-ref dump`, `compare`, `check-stage`, `check-weights` and `explain`.

A port of Voxtral Realtime to another runtime is debugged by dumping the same intermediates from both
sides and finding where they first part, in time and in the pipeline: every later row and stage differs
too, so only the code of that one stage needs reading. Modules: `names` (the table of tensor names, their
shapes and their place on the audio clock), `tensorio` (files), `capture` (running the reference with a
trace, teacher forcing, streams), `compare` (blame by position), `check_stage`, `check_weights`, `explain`,
`commands` (the command line). docs/tensors.md documents the names; docs/architecture.md the model;
docs/walkthrough.ipynb draws each stage with `capture`, `explain`'s grid and its figure.
"""

from .capture import capture, capture_stream, forced_decode
from .commands import add_oracle_parsers
from .compare import Context, Row, compare_all, compare_tensor, format_report, verdict
from .names import STAGES, TOKEN_ID_NAMES, find_stage, name_regex, pipeline_order, select, stage_names
from .tensorio import load_name_map, load_tensors, rename, save_tensors

__all__ = ["capture", "capture_stream", "forced_decode", "add_oracle_parsers", "Context", "Row", "compare_all",
           "compare_tensor", "format_report", "verdict", "STAGES", "TOKEN_ID_NAMES", "find_stage", "name_regex",
           "pipeline_order", "select", "stage_names", "load_name_map", "load_tensors", "rename", "save_tensors"]
