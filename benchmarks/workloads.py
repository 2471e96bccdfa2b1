"""The registry of workloads ``python -m benchmarks`` runs, at full or ``--quick`` sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Mapping, Optional

from . import entry, hyperlr, maml, memory, omniglot, sinusoid, text
from .paths import HIGHER, ORDER, Path, first_call
from .report import TimingResult
from .timing import interleaved


@dataclass(frozen=True)
class Settings:
    """How hard to measure: ``quick`` shrinks sizes; ``rounds`` overrides the rounds."""

    quick: bool = False
    rounds: Optional[int] = None

    @property
    def compile_kwargs(self) -> dict:
        """A cold Inductor compile takes 1-8 minutes on two cores, more than a smoke run
        can spend: ``--quick`` traces the same whole-graph meta-step (Dynamo, fullgraph,
        AOTAutograd) but runs it without Inductor's code generation."""
        return {"backend": "aot_eager"} if self.quick else {}

    def rounds_or(self, full: int) -> int:
        if self.rounds is not None:
            return self.rounds
        return 3 if self.quick else full


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    run: Callable[[Settings, Callable[[str], None]], object]
    # Why the workload cannot run on this machine ("" when it can): it is skipped, saying so.
    missing: Callable[[], str] = lambda: ""


def timed(
    workload: str,
    title: str,
    config: dict,
    paths: Mapping[str, Path],
    tolerance: float,
    rounds: int,
    log: Callable[[str], None],
) -> TimingResult:
    """First calls (compile, meta-gradient check), then interleaved timing of every path
    that ran. Paths with a wrong meta-gradient are still timed, and flagged."""
    log(f"{workload}: first call of every path (compiles the compiled one)")
    first = first_call(paths, HIGHER)
    runnable = {name: p.step for name, p in paths.items() if name not in first.failed}
    log(f"{workload}: {rounds} interleaved rounds of {', '.join(runnable)}")
    samples = interleaved(runnable, rounds)
    return TimingResult(workload, title, config, samples, first, tolerance)


def _w1(settings: Settings, log) -> TimingResult:
    sizes = sinusoid.QUICK if settings.quick else sinusoid.FULL
    paths = maml.build(sinusoid.problem(sizes), ORDER, **settings.compile_kwargs)
    title = f"sinusoid MAML, 1-40-40-1 MLP, T={sizes.tasks}, {sizes.steps} inner SGD steps"
    return timed("W1", title, asdict(sizes), paths, 1e-4, settings.rounds_or(21), log)


def _w2(settings: Settings, log) -> TimingResult:
    sizes = omniglot.QUICK if settings.quick else omniglot.FULL
    paths = maml.build(omniglot.problem(sizes), ORDER, **settings.compile_kwargs)
    title = (
        f"Omniglot-shape MAML, conv4 + BatchNorm, {sizes.ways}-way {sizes.shots}-shot, "
        f"{sizes.queries * sizes.ways} queries, T={sizes.tasks}, {sizes.steps} inner steps"
    )
    # float32 through BatchNorm and five steps of lr 0.4: correct paths agree to 1e-4 (3e-14
    # in float64); the wrong second-order term of vmap(grad) through BatchNorm shows as 7e-3.
    return timed("W2", title, asdict(sizes), paths, 1e-3, settings.rounds_or(5), log)


def _w3(settings: Settings, log) -> TimingResult:
    sizes = hyperlr.QUICK if settings.quick else hyperlr.FULL
    paths = hyperlr.build(sizes, ORDER, **settings.compile_kwargs)
    title = (
        f"learned Adam lr (override), {sizes.features}-{sizes.hidden}-{sizes.hidden}-1 Tanh "
        f"MLP, T={sizes.tasks}, {sizes.steps} inner Adam steps"
    )
    # higher's Adam adds eps before the bias correction (torch.optim's after): its
    # hypergradient differs from every other path's by ~2e-4.
    return timed("W3", title, asdict(sizes), paths, 1e-3, settings.rounds_or(21), log)


def _w4(settings: Settings, log) -> TimingResult:
    sizes = text.QUICK if settings.quick else text.FULL
    title = (
        f"tiny BERT MAML, {sizes.layers} layer(s) of {sizes.hidden}, {sizes.ways}-way "
        f"{sizes.shots}-shot, length {sizes.length}, T={sizes.tasks}, {sizes.steps} inner steps"
    )
    # float32 through two inner steps: SDPA's math kernel and eager attention round apart.
    return timed("W4", title, asdict(sizes), text.build(sizes), 1e-3, settings.rounds_or(5), log)


def _e1(settings: Settings, log) -> entry.EntryResult:
    tasks = sinusoid.QUICK.tasks if settings.quick else sinusoid.FULL.tasks
    rounds = settings.rounds_or(21)
    log(f"E1: {rounds} interleaved rounds of entering innerloop_ctx for {tasks} tasks")
    return entry.measure(tasks, rounds)


def _m1(settings: Settings, log) -> memory.MemoryResult:
    log("M1: peak tensor memory with 20 tracked inner steps")
    return memory.tracked(steps=20, tasks=4 if settings.quick else sinusoid.FULL.tasks)


def _m2(settings: Settings, log) -> memory.MemoryResult:
    log("M2: peak tensor memory with track_higher_grads=False")
    return memory.untracked((10, 50) if settings.quick else (10, 200))


WORKLOADS: Dict[str, Workload] = {
    w.id: w
    for w in [
        Workload("W1", "sinusoid MAML", _w1),
        Workload("W2", "Omniglot-shape MAML", _w2),
        Workload("W3", "hyperparameter learning", _w3),
        Workload("W4", "text MAML (tiny BERT)", _w4, text.available),
        Workload("E1", "entering innerloop_ctx", _e1),
        Workload("M1", "memory, tracked", _m1),
        Workload("M2", "memory, untracked", _m2),
    ]
}
