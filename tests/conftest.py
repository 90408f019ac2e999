"""Shared fixtures. Tests run offline on the CPU; real-model tests use the embedded SmolLM2."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _session_compilation_cache() -> None:
    """One persistent XLA compilation cache for this test run, shared by the pytest workers and inherited by
    every CLI subprocess a test starts: they compile many of the same SmolLM2 programs. A fresh folder each
    run (removed at exit), so every program is still compiled once per run and nothing carries over."""
    import atexit
    import shutil
    import tempfile

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="idjax-test-xla-cache-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


_session_compilation_cache()

import pytest  # noqa: E402


#: The longest modules (end-to-end runs of minutes each) run first: with the suite split over two
#: workers by module (.ci/run: pytest -n 2 --dist loadscope --no-loadscope-reorder; xdist would otherwise
#: start the modules with the most tests first), a long module started last would leave one worker idle
#: while the other finishes it.
LONG_MODULES_FIRST = ("test_device_suite.py", "test_readme.py", "test_demo.py", "test_distributed.py",
                      "test_notebook.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONG_MODULES_FIRST.index(name) if name in LONG_MODULES_FIRST else len(LONG_MODULES_FIRST)

    items.sort(key=rank)  # stable: each module's tests stay together and in their order


@pytest.fixture(autouse=True)
def _no_log_handler_on_a_closed_stream():
    """A logging handler created during a test (idjax.cli.main's basicConfig, transformers' own
    library handler) writes to the stderr of that moment: pytest's capture, closed after the test.
    Pointed back at the real stderr afterwards, so the test order does not decide which test fails."""
    import logging
    import sys

    yield
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.__stderr__  # not setStream: it would flush the closed one
                handler.__dict__.pop("flush", None)  # transformers binds flush to the stderr of its day


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


# ----------------------------------------------------------------------------- tiny models and examples
# Plain functions (tests import them: `from conftest import random_examples`), shared by the tests that
# check the pipeline against a PyTorch reference on a model small enough to differentiate densely.


def random_examples(n: int, seed: int, prefix: str, *, vocab: int, lengths=(6, 11, 17)):
    """n data.Example rows of random token ids in [1, vocab); the first half of each is the prompt."""
    import numpy as np

    from idjax import data

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.choice(lengths))
        ids = rng.integers(1, vocab, length).astype(np.int32)
        labels = ids.copy()
        labels[: length // 2] = data.IGNORE_INDEX
        out.append(data.Example(i, f"{prefix}{i}", None, ids, labels, False))
    return out


def tiny_llama(path, *, vocab: int = 89, seed: int = 0, max_positions: int = 64):
    """(PyTorch model, path): a 2-layer Llama with GQA and untied embeddings saved at `path`, its
    weights perturbed away from the initialisation (whose symmetries would hide indexing bugs)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf, path


def reference_propagation(emb, lm, kind, delta=1e-2):
    """(C, KRR bandwidth or None): docs/method.md 4.4 in float64 with scipy, landmark rows set to unit
    vectors; the independent reference of the propagation tests."""
    import numpy as np
    import scipy.linalg
    import scipy.spatial.distance

    x = emb.astype(np.float64)
    xl = x[lm]
    if kind == "krr":
        s = np.median(scipy.spatial.distance.pdist(xl))
        k = np.exp(-scipy.spatial.distance.cdist(x, xl, "sqeuclidean") / (2 * s**2))
    else:
        s = None
        k = x @ xl.T
    a = k[lm] + delta * np.mean(np.diag(k[lm])) * np.eye(len(lm))
    c = scipy.linalg.solve(a, k.T, assume_a="pos").T
    c[lm] = np.eye(len(lm))
    return c, s
