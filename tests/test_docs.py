"""The front door: ``import hashret`` gives the verbs lazily, each public name documented in
numpy style with an example that runs here (the doctests CI runs)."""

import doctest
import subprocess
import sys

import numpy as np
import pytest

import hashret

VERBS = ["open_index", "HashIndex", "ShardedIndex", "Engine", "build_index", "train", "load_checkpoint"]
ERRORS = ["HashretError", "CorruptError", "NotFoundError", "ConflictError"]


def test_the_front_door_lists_the_verbs_and_errors():
    assert set(VERBS + ERRORS) <= set(hashret.__all__)
    assert set(hashret.__all__) <= set(dir(hashret))


def test_import_hashret_loads_neither_torch_nor_numba():
    code = "import sys, hashret; print('torch' in sys.modules, 'numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_help_shows_the_front_door():
    code = "import hashret, pydoc; print(pydoc.render_doc(hashret, renderer=pydoc.plaintext))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in VERBS + ERRORS:
        assert name in out


@pytest.mark.parametrize("name", VERBS)
def test_every_verb_has_a_numpy_style_docstring_whose_example_runs(name, tmp_path):
    obj = getattr(hashret, name)
    doc = obj.__doc__ or ""
    for section in ("Parameters\n", "Raises\n", "Examples\n"):
        assert section in doc, f"{name} lacks {section.strip()}"
    if not isinstance(obj, type):
        assert "Returns\n" in doc, f"{name} lacks Returns"
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name, globs={"tmp": tmp_path, "np": np})
             if t.examples]
    assert tests, f"{name} has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, f"{name}'s example failed (see the output above)"


@pytest.mark.parametrize("name", ERRORS)
def test_every_error_says_when_it_is_raised(name):
    assert issubclass(getattr(hashret, name), hashret.HashretError)
    assert getattr(hashret, name).__doc__
