"""Meta-gradients sharded over processes (examples/distributed_maml.py) against one process.

Two processes on loopback with the gloo backend, each adapting half of the tasks and averaging
with ``all_reduce``, must produce the meta-gradient that one process computes over all tasks,
and stay identical to it over a few meta-training steps. Needs only torch (no extras).
"""

import datetime
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import distributed_maml  # noqa: E402
from sinusoid_tasks import make_model, sample_tasks  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)

WORLD_SIZE, TASKS, INNER_STEPS, TRAIN_STEPS = 2, 8, 3, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def meta_gradient():
    """The meta-gradient and loss over all TASKS, sharded over the current process group."""
    torch.manual_seed(0)
    model = make_model()
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tasks = sample_tasks(TASKS, 10, torch.Generator().manual_seed(0))
    loss = distributed_maml.distributed_meta_gradient(model, inner_opt, tasks, INNER_STEPS)
    return [p.grad.clone() for p in model.parameters()], loss


def train():
    model, losses = distributed_maml.train(TRAIN_STEPS, tasks=TASKS, inner_steps=INNER_STEPS)
    return [p.detach().clone() for p in model.parameters()], losses


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        grads, loss = meta_gradient()
        weights, losses = train()
        same = distributed_maml.identical_on_all_ranks(make_model_with(weights))
        torch.save(
            {"grads": grads, "loss": loss, "weights": weights, "losses": losses, "same": same},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # leave together: an early teardown can abort the peer's gloo threads
    finally:
        dist.destroy_process_group()


def make_model_with(weights):
    model = make_model()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    return model


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of two gloo processes computed (one spawn for all the tests below)."""
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=True)
    return [
        torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True)
        for r in range(WORLD_SIZE)
    ]


def test_sharded_meta_gradient_equals_the_single_process_one(two_ranks):
    assert not dist.is_initialized()
    grads, loss = meta_gradient()  # one process, all tasks
    for rank in two_ranks:
        for got, expected in zip(rank["grads"], grads):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["loss"], loss, rtol=1e-5, atol=1e-5)
    # Both ranks hold the same averaged gradient, not just close ones.
    for a, b in zip(two_ranks[0]["grads"], two_ranks[1]["grads"]):
        assert torch.equal(a, b)


def test_sharded_training_matches_single_process_training(two_ranks):
    weights, losses = train()
    assert all(rank["same"] for rank in two_ranks)
    for rank in two_ranks:
        for got, expected in zip(rank["weights"], weights):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["losses"], losses, rtol=1e-5, atol=1e-5)


def test_tasks_must_split_evenly():
    tasks = sample_tasks(5, 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="5 tasks do not split evenly over 2 processes"):
        distributed_maml.shard(tasks, 0, 2)


def test_torchrun_launch(tmp_path):
    """The README's launch command, end to end (``--standalone`` picks a free port)."""
    script = os.path.join(EXAMPLES, "distributed_maml.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [script, "--steps", "2", "--tasks", "4", "--out", str(tmp_path)]
    # The ranks import higher_func from this checkout, installed or not (and never another
    # copy that happens to be installed).
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "weights identical on all 2 ranks: True" in done.stdout
    state = torch.load(tmp_path / "distributed_maml.pt", weights_only=True)
    make_model().load_state_dict(state)
