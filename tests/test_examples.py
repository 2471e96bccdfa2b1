"""Smoke tests of the programs in examples/: each main() with tiny sizes, checked for meaning.

The examples need the ``examples`` extra (tqdm, matplotlib, scikit-learn); without it, their
tests skip. CI installs it (the README's first command) before running the tests.
"""

import json
import math
import os
import sys

import pytest
import torch

from higher_func import _compat

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


@pytest.fixture(autouse=True)
def _one_thread():
    """The examples' tensors are tiny: extra threads only add synchronisation (as in their
    ``__main__`` blocks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def needs(*modules):
    for module in modules:
        pytest.importorskip(module)


def test_maml_sinusoid_legacy_loop_and_batched_train_the_same(tmp_path):
    needs("tqdm", "matplotlib")
    import maml_sinusoid

    small = ["--steps", "4", "--tasks", "3", "--test-tasks", "6", "--out", str(tmp_path)]
    loop = maml_sinusoid.main(small + ["--mode", "loop"])
    batched = maml_sinusoid.main(small + ["--mode", "batched"])
    assert len(batched["curve"]) == 4
    assert all(math.isfinite(x) for x in batched["curve"])
    torch.testing.assert_close(batched["curve"], loop["curve"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched["trained"], loop["trained"], rtol=1e-5, atol=1e-5)
    # Five SGD steps on a task's support points lower its query loss.
    assert batched["trained"]["after"] < batched["trained"]["before"]
    assert os.path.getsize(batched["figure"]) > 0


def test_few_shot_digits(tmp_path):
    needs("tqdm", "matplotlib", "sklearn")
    import few_shot_digits

    result = few_shot_digits.main(
        ["--steps", "3", "--tasks", "2", "--test-tasks", "4", "--inner-steps", "2"]
        + ["--out", str(tmp_path)]
    )
    assert len(result["curve"]) == 3
    accuracies = result["curve"] + [result["trained"]["before"], result["trained"]["after"]]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert result["chance"] == pytest.approx(1 / 3)
    # Even a barely meta-trained net separates three digits after two SGD steps.
    assert result["trained"]["after"] > result["chance"]
    assert (tmp_path / "few_shot_digits.png").stat().st_size > 0


def test_few_shot_digits_refuses_too_few_test_digits(capsys):
    needs("tqdm", "matplotlib", "sklearn")
    import few_shot_digits

    with pytest.raises(SystemExit):
        few_shot_digits.main(["--ways", "5", "--test-digits", "7", "8", "9"])
    assert "5-way tasks need 5 meta-test digits" in capsys.readouterr().err


def test_hyperparameter_learning(tmp_path):
    needs("matplotlib")
    import hyperparameter_learning

    result = hyperparameter_learning.main(
        ["--steps", "5", "--eval-tasks", "4", "--out", str(tmp_path)]
    )
    learned = result["learned"]  # read back from the torch.optim optimizer
    for key, initial in (("lr", 0.01), ("momentum", 0.0)):
        assert type(learned[key]) is float
        assert learned[key] != initial
    assert learned["lr"] > 0.01  # a larger step helps this ill-conditioned least squares
    assert result["learned_loss"] < result["initial_loss"]
    assert (tmp_path / "hyperparameter_learning.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(
    not _compat.can_trace_autograd(),
    reason=f"higher_func.compile needs torch >= {_compat.MIN_TORCH}, this is {torch.__version__}",
)
@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_compile_maml(tmp_path, mode):
    import compile_maml

    torch._dynamo.reset()
    result = compile_maml.main(
        ["--mode", mode, "--tasks", "2", "--inner-steps", "2", "--repeats", "2"]
        + ["--out", str(tmp_path)]
    )
    for compiled, eager in zip(result["compiled_grads"], result["eager_grads"]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert result["compile_seconds"] > 0 and result["compiled_ms_per_step"] > 0
    saved = json.loads((tmp_path / "compile_maml.json").read_text())
    assert saved["mode"] == mode


def test_distributed_maml_in_one_process(tmp_path, monkeypatch):
    """Without torchrun the example runs alone; its core is tested on 2 processes in
    test_distributed.py."""
    import distributed_maml
    from sinusoid_tasks import make_model

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed_maml.main(["--steps", "3", "--tasks", "4", "--out", str(tmp_path)])
    make_model().load_state_dict(torch.load(tmp_path / "distributed_maml.pt", weights_only=True))
