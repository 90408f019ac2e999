"""Shared fixtures. Tests run offline on the CPU; real-model tests use the embedded SmolLM2."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    from idjax.models import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32, loaded once per run."""
    from idjax.models import load

    return load(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session")
def interruptible_cli():
    """argv prefix running `idjax.cli` in a fresh Python whose Ctrl-C raises KeyboardInterrupt.

    A test run started with SIGINT ignored (under GNU time, or as a background job of a shell without
    job control, as some CI runners start it) passes SIG_IGN on to every child, and Python then never
    raises KeyboardInterrupt: the interrupt tests must not depend on how the test run was started.
    """
    import sys

    code = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('idjax.cli', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code]
