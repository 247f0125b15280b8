"""Fixtures of the distillation plugin's tests: the demo model as the student and a teacher of
another width beside it (one tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory) -> Path:
    """The demo's tiny Llama (hidden size 128) and tokenizer."""
    from align import demo

    path = tmp_path_factory.mktemp("student")
    demo.build_demo_model(path)
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """The demo architecture at hidden size 64 and 2 layers: another model, the same
    tokenizer."""
    from align import demo

    path = tmp_path_factory.mktemp("teacher")
    demo.build_demo_model(path, hidden_size=64, layers=2)
    return path
