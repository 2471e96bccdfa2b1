"""Differentiable optimizers: ``torch.optim`` steps that stay on the autograd tape.

Every optimizer's update is one pure function in ``higher_func._rules`` (tensors in, tensors
out, no in-place writes). The classes here only translate what a ``torch.optim`` optimizer
knows (parameter groups, hyperparameters, state) and what higher's API adds (``override``,
``grad_callback``, patched modules) into calls of that rule.

Example:
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
    >>> fmodel = higher_func.monkeypatch(model, copy_initial_weights=False)
    >>> diffopt = get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    >>> for _ in range(3):
    ...     diffopt.step(fmodel(torch.randn(8, 3)).pow(2).mean())
    >>> fmodel(torch.randn(8, 3)).sum().backward()  # through all three Adam steps

Numerics: by default every step rounds as today's ``torch.optim`` does. To reproduce results
obtained with higher 0.2.1 bit for bit (its SGD rounds ``p - lr * g`` twice, its Adam adds
``eps`` before the bias correction, and so on), switch to higher's numerics without touching
the legacy code, with the environment variable ``HIGHER_FUNC_NUMERICS=higher`` (read at
import; ``torch`` or empty is the default, anything else an error), or in code::

    higher_func.optim.numerics("higher")          # from now on
    with higher_func.optim.numerics("higher"):    # only inside the block
        ...
    higher_func.optim.get_numerics()              # "torch" or "higher"

The mode is read at every ``step``. It covers the optimizers higher shipped (SGD, Adam,
Adadelta, Adagrad, Adamax, ASGD, RMSprop, Rprop); AdamW, NAdam and RAdam, which higher did not
have, always use torch.optim's numerics.

Differs from higher: the numerics are today's ``torch.optim`` ones unless switched (see
above); higher ignored ``maximize``, which is honoured in both modes; frozen parameters stay
frozen when not tracking higher-order gradients; there is no gradient hook to hide NaNs (the
rules avoid them); ``reference_params`` that leave out frozen parameters are matched to the
patched module's weights by identity, not by position.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Type

import torch

from . import _rules
from . import patch as _patch
from ._batching import check_num_tasks
from ._rules import RULES, UpdateRule

_OverrideType = Dict[str, List[Any]]
_GradCallbackType = Callable[[List[Optional[torch.Tensor]]], List[Optional[torch.Tensor]]]
_GroupedGradsType = List[List[Optional[torch.Tensor]]]

__all__ = [
    "RULES",
    "UpdateRule",
    "DifferentiableOptimizer",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdamax",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableNAdam",
    "DifferentiableRAdam",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
    "numerics",
    "get_numerics",
]

# -- numerics switch ------------------------------------------------------------------------------
_NUMERICS_MODES = ("torch", "higher")
_NUMERICS_ENV = "HIGHER_FUNC_NUMERICS"


def _checked_mode(mode: Any, where: str) -> str:
    if mode not in _NUMERICS_MODES:
        raise ValueError(
            f"{where} must be 'torch' (today's torch.optim numerics, the default) or 'higher' "
            f"(higher 0.2.1's, to reproduce old results), got {mode!r}"
        )
    return mode


def _numerics_from_environment() -> str:
    value = os.environ.get(_NUMERICS_ENV, "")
    return "torch" if value == "" else _checked_mode(value, f"environment variable {_NUMERICS_ENV}")


# One process-wide mode (not per thread): it describes which results a program reproduces.
_numerics = _numerics_from_environment()


class _NumericsScope:
    """What ``numerics(mode)`` returns: the mode is already set; leaving a ``with`` block
    restores the one before."""

    def __init__(self, previous: str, mode: str) -> None:
        self._previous = previous
        self._mode = mode

    def __enter__(self) -> "_NumericsScope":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        global _numerics
        _numerics = self._previous

    def __repr__(self) -> str:
        return f"numerics({self._mode!r})"


def numerics(mode: str) -> _NumericsScope:
    """Choose whose numerics the differentiable optimizers reproduce.

    Args:
        mode: ``"torch"`` (the default): every step rounds as today's ``torch.optim`` does.
            ``"higher"``: every step of an optimizer that higher 0.2.1 shipped rounds as
            higher did (see ``UpdateRule.higher`` in ``higher_func._rules``), so unrolls and
            meta-gradients of a legacy program equal the old ones bit for bit.

    Returns:
        A context manager. The mode is set at once (a plain call changes it for good); used
        in a ``with`` statement, the previous mode comes back at the end of the block.

    Raises:
        ValueError: ``mode`` is neither ``"torch"`` nor ``"higher"``.

    Example:
        >>> with numerics("higher"):
        ...     get_numerics()
        'higher'
        >>> get_numerics()
        'torch'

    The environment variable ``HIGHER_FUNC_NUMERICS`` sets the initial mode at import, for
    programs that cannot be edited. The mode is process-wide, not per thread, and is read at
    every ``step``.
    """
    global _numerics
    scope = _NumericsScope(_numerics, _checked_mode(mode, "numerics(mode)"))
    _numerics = mode
    return scope


def get_numerics() -> str:
    """The current numerics mode, ``"torch"`` or ``"higher"`` (see ``numerics``)."""
    return _numerics


class DifferentiableOptimizer:
    """A differentiable copy of a ``torch.optim`` optimizer, with its groups and state.

    Args:
        other: the optimizer to copy (hyperparameters, parameter groups and any state it has
            accumulated, e.g. momentum after some ordinary training steps).
        reference_params: the parameters of the model ``other`` optimizes, in
            ``model.parameters()`` order; the fast weights passed to ``step`` follow it. With
            ``fmodel``, they may be any subset of the patched module's own parameters (the
            trainable ones, say): they are found in it by identity, ``step`` then takes and
            returns all of its fast weights in ``model.parameters()`` order, and updates only
            those of ``reference_params`` (the others keep their values).
        fmodel: optional patched module whose fast weights ``step`` reads and updates.
        device: optional device to move the copied state to.
        override: optional ``{hyperparameter: [value]}`` (one value for all groups) or
            ``{hyperparameter: [v_group0, v_group1, ...]}``; any sequence works in place of
            the list (an ``nn.ParameterList``, a slice of one), and for pair hyperparameters
            such as ``betas`` too. Values may be tensors requiring grad (a learned learning
            rate), through which hypergradients flow: one value, or elementwise values
            broadcastable to the shape of every parameter of the group (per-parameter
            learning rates); batched, see ``num_tasks``.
        grad_callback: optional ``f(grads) -> grads`` applied to the list of gradients
            (``reference_params`` order, ``None`` for frozen or unused weights) on every step,
            e.g. for clipping.
        track_higher_grads: if False, the steps are not differentiable (test mode): weights
            and state are detached after every step, so memory stays flat.
        first_order: if True, inner gradients are taken without ``create_graph`` (treated as
            constants), but each update ``w - lr * g`` stays on the tape: meta-gradients are
            the first-order MAML approximation (FOMAML) instead of ``None``.
        num_tasks: the number of stacked tasks (defaults to ``fmodel.num_tasks``): the fast
            weights are ``[num_tasks, *shape]``, ``step`` takes one loss per task and the state
            is per task. A tensor hyperparameter then has one of the shapes ``[num_tasks]``
            (one value per task), ``[*shape]`` or anything broadcastable to it (the same
            elementwise values for every task), or ``[num_tasks, *shape]`` (elementwise per
            task; broadcastable to it, e.g. ``[1, *shape]``). A 1-D ``[num_tasks]`` is
            always per task, even for a 1-D weight of that length: write ``[1, num_tasks]``
            for elementwise values shared by every task there.

    Raises:
        ValueError: a parameter of ``other`` is not among ``reference_params``, or
            ``override`` does not fit the parameter groups (count, type, or a tensor's shape).

    Differs from higher: with ``fmodel``, ``reference_params`` that leave out some of the
    module's parameters are matched by identity; higher matched them by position and
    silently updated the wrong weights.
    """

    #: The pure update rule of this optimizer (see ``higher_func._rules``). Subclasses written
    #: for higher that override ``_update`` instead keep working.
    rule: Optional[_rules.UpdateRule] = None

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[torch.Tensor],
        fmodel: Optional[_patch._MonkeyPatchBase] = None,
        device: Optional[torch.device] = None,
        override: Optional[_OverrideType] = None,
        grad_callback: Optional[_GradCallbackType] = None,
        track_higher_grads: bool = True,
        first_order: bool = False,
        num_tasks: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        _no_unknown_options("DifferentiableOptimizer()", kwargs)
        if not isinstance(other, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(other).__name__}")
        self.num_tasks = _num_tasks(num_tasks, fmodel)
        reference_params = list(reference_params)
        # Fast weights (what step() updates) follow the patched module's parameter order when
        # the reference parameters are that module's own: then a trainable subset (frozen
        # parameters left out) is mapped by identity and the others are carried over. Any
        # other reference list (e.g. create_diff_optim's placeholders) is positional.
        fast_weights = _module_parameters(fmodel, reference_params)
        position = {id(p): i for i, p in enumerate(fast_weights)}
        self.param_groups: List[Dict[str, Any]] = []
        self._group_to_param_list: List[List[int]] = []
        self.state: List[Dict[int, Dict[str, Any]]] = []
        for g, group in enumerate(other.param_groups):
            indices = []
            for i, p in enumerate(group["params"]):
                if id(p) not in position:
                    raise ValueError(
                        f"parameter {i} of group {g} (shape {tuple(p.shape)}) is not among "
                        "reference_params: pass the parameters of the model the optimizer "
                        "was built on"
                    )
                indices.append(position[id(p)])
            # A shallow copy suffices: the rules never write into a hyperparameter.
            hyper = {k: v for k, v in group.items() if k != "params"}
            self.param_groups.append({**hyper, "params": [None] * len(indices)})
            self._group_to_param_list.append(indices)
            self.state.append(collections.defaultdict(dict))
            for i, p in enumerate(group["params"]):
                if other.state.get(p):
                    self.state[g][i] = _import_state(other.state[p], device, self.num_tasks)
        self._num_params = len(fast_weights)
        self._shapes = [p.shape for p in fast_weights]
        if override is not None:
            self._apply_override(override)
        self._grad_callback = grad_callback
        self._fmodel = fmodel
        self._track_higher_grads = _check_bool("track_higher_grads", track_higher_grads)
        self._first_order = _check_bool("first_order", first_order)

    # -- stepping --------------------------------------------------------------------------------
    def step(
        self,
        loss: torch.Tensor,
        params: Optional[Iterable[torch.Tensor]] = None,
        override: Optional[_OverrideType] = None,
        grad_callback: Optional[_GradCallbackType] = None,
        **kwargs: Any,
    ) -> List[torch.Tensor]:
        """One optimizer step on the gradient of ``loss``, replacing
        ``opt.zero_grad(); loss.backward(); opt.step()``.

        Args:
            loss: a scalar loss computed with the current fast weights.
            params: the fast weights to update (``reference_params`` order); defaults to the
                patched module's current ones.
            override: as in the constructor; replaces the stored overrides from now on.
            grad_callback: as in the constructor, for this step only.

        Returns:
            The new fast weights; the patched module (if any) now holds them.

        Raises:
            ValueError: ``loss`` is not a scalar or does not require grad, or there are no
                fast weights to update.
        """
        # Everything is checked before anything changes: a step that raises leaves the
        # optimizer (overrides included) as it was.
        _no_unknown_options("step()", kwargs)
        if override is not None:
            override = self._check_override(override)
        params = self._current_params(params)
        self._check_loss(loss)
        grads = self._gradients(loss, params)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = _checked_gradients(callback(grads), params, self._label)
        # The update itself is a transaction too: if a rule or the patched module raises
        # (an override of the wrong type, KeyboardInterrupt...), groups and state roll back.
        saved_groups = [dict(group) for group in self.param_groups]
        saved_state = [{i: dict(s) for i, s in states.items()} for states in self.state]
        try:
            if override is not None:
                self._apply_override(override)
            new_params = self._apply_updates(params, grads)
            if self._fmodel is not None:
                self._fmodel.update_params(new_params)
        except BaseException:
            for group, saved in zip(self.param_groups, saved_groups):
                group.clear()
                group.update(saved)
            for states, saved in zip(self.state, saved_state):
                states.clear()
                states.update(saved)
            raise
        return new_params

    def _current_params(self, params: Optional[Iterable[torch.Tensor]]) -> List[torch.Tensor]:
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError(
                    "step() needs params= when the optimizer has no patched module with fast "
                    "weights (pass fmodel= when creating it, or params= to step)"
                )
            params = self._fmodel.fast_params
        if isinstance(params, (dict, torch.Tensor)):
            raise TypeError(
                "step(params=...) takes a list of tensors in reference_params order, got a "
                f"{type(params).__name__}"
            )
        params = list(params)
        if len(params) != self._num_params:
            raise ValueError(
                f"step() got {len(params)} parameters, expected {self._num_params} "
                "(one per reference parameter)"
            )
        for i, (p, shape) in enumerate(zip(params, self._shapes)):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{self._label(i)} must be a tensor, got {type(p).__name__}")
            stacked = shape if self.num_tasks is None else (self.num_tasks, *shape)
            if p.shape != stacked:
                raise ValueError(
                    f"{self._label(i)} has shape {tuple(p.shape)}, expected {tuple(stacked)}"
                )
        return params

    def _label(self, i: int) -> str:
        """How errors name the i-th weight: by its module name when a patched module is known."""
        names = getattr(getattr(self._fmodel, "_plan", None), "param_names", None)
        return f"parameter {names[i]!r}" if names else f"parameter {i}"

    def _check_loss(self, loss: torch.Tensor) -> None:
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
        if self.num_tasks is not None:
            if loss.shape != (self.num_tasks,):
                raise ValueError(
                    f"a batched step needs one loss per task, shape ({self.num_tasks},); got "
                    f"shape {tuple(loss.shape)}. Do not average over tasks: a mean would "
                    "silently shrink every task's step by 1/num_tasks"
                )
        elif loss.numel() != 1:
            raise ValueError(
                f"loss must be a scalar, got shape {tuple(loss.shape)} (reduce it, e.g. .mean())"
            )

    def _gradients(
        self, loss: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> List[Optional[torch.Tensor]]:
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        grads: List[Optional[torch.Tensor]] = [None] * len(params)
        if not trainable:
            return grads
        if not loss.requires_grad:
            raise ValueError(
                "loss does not require grad: compute it with the patched module's fast weights"
            )
        # Tasks are independent: d(sum of task losses)/d(stacked weights) is each task's gradient.
        found = torch.autograd.grad(
            loss if loss.dim() == 0 else loss.sum(),
            [params[i] for i in trainable],
            create_graph=self._track_higher_grads and not self._first_order,
            # A weight the loss does not use gets no gradient and, as in torch.optim when
            # p.grad is None, keeps its value and state.
            allow_unused=True,
        )
        if all(g is None for g in found):
            raise ValueError(
                "the loss does not depend on any fast weight: compute it with the patched "
                "module (fmodel(x)), not the original one"
            )
        for i, g in zip(trainable, found):
            grads[i] = g
        return grads

    def _apply_updates(
        self, params: List[torch.Tensor], grads: List[Optional[torch.Tensor]]
    ) -> List[torch.Tensor]:
        grouped_grads = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            group["params"] = [params[i] for i in mapping]
            grouped_grads.append([grads[i] for i in mapping])
        self._update(grouped_grads)
        new_params = list(params)
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            for i, p in zip(mapping, group["params"]):
                new_params[i] = p
        if not self._track_higher_grads:
            new_params = [p.detach().requires_grad_(p.requires_grad) for p in new_params]
            self.detach_state()
            # group["params"] must not keep the undetached results (and the step before) alive.
            for group, mapping in zip(self.param_groups, self._group_to_param_list):
                group["params"] = [new_params[i] for i in mapping]
        return new_params

    def _update(self, grouped_grads: _GroupedGradsType, **kwargs: Any) -> None:
        """Replace ``group['params']`` by the updated weights (higher's subclass protocol)."""
        rule = self.rule
        if rule is None:
            raise NotImplementedError(
                f"{type(self).__name__} defines neither a `rule` nor an `_update` method"
            )
        update = rule.select(_numerics)
        for group, grads, states in zip(self.param_groups, grouped_grads, self.state):
            hyper = {k: group[k] for k in rule.hyperparameters if k in group}
            per_task = self.num_tasks is not None and _has_per_task(hyper, self.num_tasks)
            params = group["params"]
            for i, g in enumerate(grads):
                if g is not None:
                    h = hyper
                    if per_task:
                        h = _broadcast_per_task(hyper, params[i].dim(), self.num_tasks)
                    params[i], states[i] = update(params[i], g, states[i], **h)

    # -- overrides ---------------------------------------------------------------------------------
    def _check_override(self, override: Any) -> _OverrideType:
        group_shapes = [[self._shapes[i] for i in m] for m in self._group_to_param_list]
        return _check_override(override, self.param_groups, self.num_tasks, group_shapes)

    def _apply_override(self, override: _OverrideType) -> None:
        override = self._check_override(override)
        for key, values in override.items():
            for g, group in enumerate(self.param_groups):
                value = values[0] if len(values) == 1 else values[g]
                # A one-element tensor of any shape is one value: as a 0-dim tensor it
                # broadcasts without changing the shape of the weights it scales.
                group[key] = _map_leaves(value, _as_scalar_if_single)

    # -- state export ------------------------------------------------------------------------------
    def state_dict(self, task: Optional[int] = None) -> Dict[str, Any]:
        """The state in ``torch.optim``'s format, to continue with an ordinary optimizer.

        Args:
            task: for a batched optimizer, which task's state to export (required then).

        Example:
            >>> opt.load_state_dict(diffopt.state_dict())  # opt over model.parameters()

        Tensor hyperparameters (learned overrides) are exported as Python floats; state tensors
        are detached copies.

        Raises:
            ValueError: ``task`` is missing for a batched optimizer, or given for another.
        """
        if (task is None) != (self.num_tasks is None):
            raise ValueError(
                "state_dict(task=t) selects one task of a batched optimizer; it is required "
                "with num_tasks and meaningless without"
            )
        state: Dict[int, Dict[str, Any]] = {}
        groups = []
        start = 0
        for group, group_state in zip(self.param_groups, self.state):
            count = len(group["params"])
            for i in range(count):
                if group_state.get(i):
                    shape = _unstacked_shape(group["params"][i], self.num_tasks)
                    state[start + i] = _export_state(group_state[i], task, self.num_tasks, shape)
            hyper = {
                k: _to_python(v if task is None else _select_task(v, task, self.num_tasks))
                for k, v in group.items()
                if k != "params"
            }
            groups.append({**hyper, "params": list(range(start, start + count))})
            start += count
        return {"state": state, "param_groups": groups}

    def detach_state(self) -> None:
        """Detach every state tensor (momentum, moments...) from the graph, e.g. to truncate
        backpropagation between unrolls. Detach the fast weights too, with
        ``fmodel.update_params([p.detach().requires_grad_() for p in fmodel.parameters()])``."""
        for group_state in self.state:
            for i, s in group_state.items():
                group_state[i] = {
                    k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in s.items()
                }

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(
            "deepcopy of a differentiable optimizer is not supported (its state is part of an "
            "autograd graph); export it with diffopt.state_dict() into a torch.optim optimizer"
        )

    def __repr__(self) -> str:
        groups = ", ".join(
            "{" + ", ".join(f"{k}={_to_python(v)!r}" for k, v in g.items() if k != "params") + "}"
            for g in self.param_groups
        )
        return f"{type(self).__name__}([{groups}])"


def _no_unknown_options(where: str, kwargs: Dict[str, Any]) -> None:
    # higher swallowed unknown keywords; a misspelt option (first_ordr=True) should not be.
    if kwargs:
        raise TypeError(f"{where} got unexpected keyword arguments {sorted(kwargs)}")


def _checked_gradients(
    grads: Any, params: Sequence[torch.Tensor], label: Callable[[int], str]
) -> List[Optional[torch.Tensor]]:
    """What a grad_callback returned: one gradient (or None) per parameter, shaped like it."""
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(
            f"grad_callback returned {len(grads)} gradients for {len(params)} parameters"
        )
    for i, (g, p) in enumerate(zip(grads, params)):
        if g is None:
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(
                f"grad_callback returned a {type(g).__name__} for {label(i)}; "
                "expected a tensor or None"
            )
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(
                f"grad_callback returned a gradient of shape {tuple(g.shape)} and {g.dtype} for "
                f"{label(i)}, which has shape {tuple(p.shape)} and {p.dtype}"
            )
    return grads


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _num_tasks(num_tasks: Optional[int], fmodel: Any) -> Optional[int]:
    from_model = getattr(fmodel, "num_tasks", None) if fmodel is not None else None
    if num_tasks is None:
        return from_model
    check_num_tasks(num_tasks)
    if fmodel is not None and from_model != num_tasks:
        raise ValueError(f"num_tasks={num_tasks} but the patched module has {from_model}")
    return num_tasks


def _as_scalar_if_single(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dim() > 0:
        return x.reshape(())
    return x


def _is_per_task(x: Any, num_tasks: int) -> bool:
    return isinstance(x, torch.Tensor) and x.shape == (num_tasks,)


def _has_per_task(hyper: Dict[str, Any], num_tasks: int) -> bool:
    return any(
        _is_per_task(leaf, num_tasks)
        for value in hyper.values()
        for leaf in (value if isinstance(value, (tuple, list)) else (value,))
    )


def _broadcast_per_task(hyper: Dict[str, Any], ndim: int, num_tasks: int) -> Dict[str, Any]:
    """Reshape ``[T]`` hyperparameters to ``[T, 1, ...]`` to broadcast over a weight's dims.

    Elementwise ones (``[*shape]``, ``[T, *shape]``) already broadcast against the stacked
    ``[T, *shape]`` weight as they are.
    """

    def reshape(x: Any) -> Any:
        if _is_per_task(x, num_tasks):
            return x.reshape(-1, *([1] * (ndim - 1)))
        return x

    return {k: _map_leaves(v, reshape) for k, v in hyper.items()}


def _select_task(value: Any, task: int, num_tasks: Optional[int]) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_tasks:
        return value[task]
    if isinstance(value, (tuple, list)):
        return type(value)(_select_task(v, task, num_tasks) for v in value)
    return value


def _as_list(value: Any) -> Optional[List[Any]]:
    """``value`` as a list if it is a sequence (``len()`` and indexing, as higher required:
    a list, a tuple, an ``nn.ParameterList`` or a slice of one), else None."""
    if isinstance(value, (str, bytes, dict, torch.Tensor)):
        return None
    if not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        return None
    return [value[i] for i in range(len(value))]


def _check_override(
    override: Any,
    groups: List[Dict[str, Any]],
    num_tasks: Optional[int] = None,
    group_shapes: Optional[List[List[torch.Size]]] = None,
) -> _OverrideType:
    """Validate ``{key: [value] or [value per group]}`` against the optimizer's groups.

    Args:
        group_shapes: the (unstacked) shapes of each group's weights, against which tensor
            values may be elementwise; None allows only one value per tensor.

    Returns:
        A new dict with every sequence turned into a list, and pair values (``betas``) into
        the type of the group's current value, so no ``nn.ParameterList`` reaches a group.
    """
    if not isinstance(override, dict):
        raise TypeError(f"override must be a dict of lists, got {type(override).__name__}")
    checked: _OverrideType = {}
    for key, values in override.items():
        if key == "params" or key not in groups[0]:
            known = sorted(k for k in groups[0] if k != "params")
            raise KeyError(f"override names {key!r}, which is not a hyperparameter of {known}")
        as_list = _as_list(values)
        if as_list is None:
            raise TypeError(
                f"override[{key!r}] must be a list (or any sequence, e.g. an "
                "nn.ParameterList): [value] for all groups or one value per group, got "
                f"{type(values).__name__}"
            )
        if len(as_list) not in (1, len(groups)):
            raise ValueError(
                f"override[{key!r}] has {len(as_list)} values; expected 1 or one per "
                f"parameter group ({len(groups)})"
            )
        checked[key] = []
        for g, value in enumerate(as_list):
            if group_shapes is None:
                shapes = None
            elif len(as_list) == 1:
                shapes = [shape for group in group_shapes for shape in group]
            else:
                shapes = group_shapes[g]
            checked[key].append(
                _check_override_value(key, value, groups[0][key], num_tasks, shapes)
            )
    return checked


def _check_override_value(
    key: str,
    value: Any,
    current: Any,
    num_tasks: Optional[int],
    shapes: Optional[List[torch.Size]],
) -> Any:
    """Check one override value against the group's current one; return it normalised."""
    if isinstance(current, bool) or current is None or isinstance(current, str):
        if type(value) is not type(current):
            raise TypeError(f"override[{key!r}] must be a {type(current).__name__}, got {value!r}")
    elif isinstance(current, (tuple, list)):
        items = _as_list(value)
        if items is None or len(items) != len(current):
            raise TypeError(
                f"override[{key!r}] must be a sequence of {len(current)} numbers or tensors, "
                f"got {value!r}"
            )
        return type(current)(
            _check_override_value(key, v, c, num_tasks, shapes) for v, c in zip(items, current)
        )
    elif isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"override[{key!r}] must be a floating-point tensor, got {value.dtype}")
        if value.numel() != 1:
            _check_elementwise(key, value, num_tasks, shapes)
    elif not _is_number(value):
        raise TypeError(f"override[{key!r}] must be a number or a tensor, got {value!r}")
    elif not math.isfinite(value):
        raise ValueError(f"override[{key!r}] must be finite, got {value!r}")
    return value


def _check_elementwise(
    key: str, value: torch.Tensor, num_tasks: Optional[int], shapes: Optional[List[torch.Size]]
) -> None:
    """A tensor hyperparameter of more than one value must broadcast to every weight it
    scales without changing that weight's shape (see ``DifferentiableOptimizer``)."""
    if num_tasks is not None and value.shape == (num_tasks,):
        return
    if shapes is None:
        raise ValueError(
            f"override[{key!r}] has shape {tuple(value.shape)}; expected one value here"
        )
    for shape in shapes:
        target = tuple(shape)
        if num_tasks is not None and value.dim() == len(shape) + 1:
            target = (num_tasks, *shape)
        try:
            fits = (
                value.dim() <= len(target) and torch.broadcast_shapes(value.shape, target) == target
            )
        except RuntimeError:
            fits = False
        if not fits:
            expected = f"one value or a shape broadcastable to {tuple(shape)}"
            if num_tasks is not None:
                expected += f", ({num_tasks},) or ({num_tasks}, *{tuple(shape)})"
            raise ValueError(
                f"override[{key!r}] has shape {tuple(value.shape)}, which does not fit a "
                f"weight of shape {tuple(shape)} in its group; expected {expected}"
            )


def _import_state(
    state: Dict[str, Any], device: Optional[torch.device], num_tasks: Optional[int]
) -> Dict[str, Any]:
    """A detached copy of one parameter's ``torch.optim`` state, with ``step`` as an int (and
    every tensor repeated per task when batched)."""
    copied = {}
    for key, value in state.items():
        if value is None:
            continue
        if key == "step":
            value = int(value.item()) if isinstance(value, torch.Tensor) else int(value)
        elif isinstance(value, torch.Tensor):
            value = value.detach()
            if num_tasks is not None and value.dim() > 0:
                # Per-weight state is repeated per task; 0-dim state (ASGD's eta and mu,
                # NAdam's mu_product) is one value that broadcasts to every task as it is.
                value = value.expand(num_tasks, *value.shape)
            value = value.clone() if device is None else value.to(device, copy=True)
        copied[key] = value
    return copied


def _unstacked_shape(param: Any, num_tasks: Optional[int]) -> Optional[torch.Size]:
    if not isinstance(param, torch.Tensor):
        return None
    return param.shape if num_tasks is None else param.shape[1:]


def _export_state(
    state: Dict[str, Any],
    task: Optional[int],
    num_tasks: Optional[int],
    param_shape: Optional[torch.Size],
) -> Dict[str, Any]:
    exported = {}
    for key, value in state.items():
        if key == "step":
            value = torch.tensor(float(value), dtype=torch.float32)
        elif isinstance(value, torch.Tensor):
            value = _select_task(value, task, num_tasks) if task is not None else value
            if value.shape != param_shape and value.numel() == 1:
                value = value.reshape(())  # a scalar state broadcast per task, e.g. ASGD's eta
            value = value.detach().clone()
        else:
            value = torch.tensor(value)
        exported[key] = value
    return exported


def _to_python(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_python(v) for v in value)
    return value


def _optimizer_class(name: str, rule_name: str, torch_name: str) -> Type[DifferentiableOptimizer]:
    doc = (
        f"A differentiable ``torch.optim.{torch_name}``: the update of "
        f"``higher_func._rules.{rule_name}`` on the autograd tape.\n\n"
        "See ``DifferentiableOptimizer`` for the arguments."
    )
    return type(name, (DifferentiableOptimizer,), {"rule": _rules.RULES[rule_name], "__doc__": doc})


DifferentiableSGD = _optimizer_class("DifferentiableSGD", "sgd", "SGD")
DifferentiableAdam = _optimizer_class("DifferentiableAdam", "adam", "Adam")
DifferentiableAdamW = _optimizer_class("DifferentiableAdamW", "adamw", "AdamW")
DifferentiableAdadelta = _optimizer_class("DifferentiableAdadelta", "adadelta", "Adadelta")
DifferentiableAdagrad = _optimizer_class("DifferentiableAdagrad", "adagrad", "Adagrad")
DifferentiableAdamax = _optimizer_class("DifferentiableAdamax", "adamax", "Adamax")
DifferentiableASGD = _optimizer_class("DifferentiableASGD", "asgd", "ASGD")
DifferentiableRMSprop = _optimizer_class("DifferentiableRMSprop", "rmsprop", "RMSprop")
DifferentiableRprop = _optimizer_class("DifferentiableRprop", "rprop", "Rprop")
DifferentiableNAdam = _optimizer_class("DifferentiableNAdam", "nadam", "NAdam")
DifferentiableRAdam = _optimizer_class("DifferentiableRAdam", "radam", "RAdam")

_opt_mapping: Dict[type, Type[DifferentiableOptimizer]] = {
    torch.optim.SGD: DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.ASGD: DifferentiableASGD,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Rprop: DifferentiableRprop,
    torch.optim.NAdam: DifferentiableNAdam,
    torch.optim.RAdam: DifferentiableRAdam,
}


def _differentiable_type(opt_type: type) -> Type[DifferentiableOptimizer]:
    try:
        return _opt_mapping[opt_type]
    except KeyError:
        raise ValueError(
            f"optimizer type {opt_type.__name__} has no differentiable version; register one "
            f"with higher_func.register_optim({opt_type.__name__}, DifferentiableX), where "
            "DifferentiableX subclasses higher_func.optim.DifferentiableOptimizer with a `rule`"
        ) from None


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[torch.Tensor],
    fmodel: Optional[_patch._MonkeyPatchBase] = None,
    device: Optional[torch.device] = None,
    override: Optional[_OverrideType] = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable version of an existing optimizer, with a copy of its state.

    Args:
        opt: a ``torch.optim`` optimizer of a supported (or registered) type.
        reference_params: ``model.parameters()`` of the model ``opt`` optimizes.
        fmodel, device, override, track_higher_grads, **kwargs: see
            ``DifferentiableOptimizer`` (``grad_callback=``, ``first_order=`` among kwargs).

    Raises:
        ValueError: ``opt``'s type is not registered (the message says how to register it).
    """
    return _differentiable_type(type(opt))(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: Type[torch.optim.Optimizer],
    opt_kwargs: Optional[Dict[str, Any]] = None,
    params: Optional[Iterable[Any]] = None,
    fmodel: Optional[_patch._MonkeyPatchBase] = None,
    device: Optional[torch.device] = None,
    override: Optional[_OverrideType] = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A differentiable optimizer built from scratch, without an existing optimizer.

    Args:
        opt_type: a supported (or registered) ``torch.optim`` class.
        opt_kwargs: keyword arguments for ``opt_type`` (``lr=`` ...).
        params: the fast weights to optimize (only their shapes are used), or parameter
            groups (dicts with a ``'params'`` list and per-group hyperparameters). Defaults to
            ``fmodel.parameters()``.
        fmodel, device, override, track_higher_grads, **kwargs: see ``get_diff_optim``.

    Raises:
        ValueError: neither ``params`` nor ``fmodel`` is given, or ``opt_type`` is unknown.
    """
    diff_type = _differentiable_type(opt_type)
    if params is not None:
        params = list(params)
    elif fmodel is not None:
        params = list(fmodel.parameters())
    else:
        raise ValueError("create_diff_optim needs params= or fmodel=")
    if params and isinstance(params[0], dict):
        groups = [
            {**g, "params": [torch.zeros_like(p, requires_grad=True) for p in g["params"]]}
            for g in params
        ]
        reference = [p for g in groups for p in g["params"]]
    else:
        groups = reference = [torch.zeros_like(p, requires_grad=True) for p in params]
    opt = opt_type(groups, **(opt_kwargs or {}))
    return diff_type(
        opt,
        reference,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def register_optim(
    optim_type: Type[torch.optim.Optimizer], diff_optim_type: Type[DifferentiableOptimizer]
) -> None:
    """Make ``get_diff_optim``/``innerloop_ctx`` accept optimizers of ``optim_type``.

    Args:
        optim_type: a ``torch.optim.Optimizer`` subclass.
        diff_optim_type: a ``DifferentiableOptimizer`` subclass with a ``rule`` (a
            ``higher_func._rules.UpdateRule``), or higher-style with an ``_update`` method.

    Raises:
        TypeError: either argument is not such a class.
    """
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(f"optim_type must be a torch.optim.Optimizer subclass, got {optim_type!r}")
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"diff_optim_type must subclass DifferentiableOptimizer, got {diff_optim_type!r}"
        )
    _opt_mapping[optim_type] = diff_optim_type


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: Optional[torch.device] = None
) -> _OverrideType:
    """An ``override`` dict making every numeric hyperparameter of ``opt`` a learnable tensor.

    Only numbers (and tuples of numbers, like ``betas``) become float tensors requiring grad;
    flags such as ``maximize``, ``nesterov`` or ``capturable`` never do.

    Returns:
        ``{name: [tensor per group]}``, ready for ``override=``.

    Differs from higher: booleans are not turned into trainable tensors.
    """

    def learnable(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.detach().clone().float().to(device).requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    def is_numeric(x: Any) -> bool:
        if isinstance(x, (tuple, list)):
            return len(x) > 0 and all(is_numeric(v) for v in x)
        return _is_number(x) or (isinstance(x, torch.Tensor) and x.is_floating_point())

    override: _OverrideType = {}
    for group in opt.param_groups:
        for key, value in group.items():
            if key != "params" and is_numeric(value):
                override.setdefault(key, []).append(_map_leaves(value, learnable))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: _OverrideType) -> None:
    """Write learned hyperparameters (an ``override`` dict) back into ``opt``'s groups.

    Raises:
        ValueError/TypeError/KeyError: ``override`` does not fit ``opt``'s groups.

    Differs from higher: a learned value replaces an integer default as a float (higher
    truncated a learned momentum of 0.9 into ``int`` 0).
    """
    for key, values in _check_override(override, opt.param_groups).items():
        for g, group in enumerate(opt.param_groups):
            value = values[0] if len(values) == 1 else values[g]
            group[key] = _write_back(value, group[key])


def _map_leaves(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_map_leaves(v, fn) for v in value)
    return fn(value)


def _write_back(value: Any, target: Any) -> Any:
    if isinstance(target, (tuple, list)):
        return type(target)(_write_back(v, t) for v, t in zip(value, target))
    if isinstance(target, torch.Tensor):
        with torch.no_grad():
            target.copy_(value)
        return target
    return _to_python(value) if isinstance(value, torch.Tensor) else value


# -- higher's arithmetic helpers --------------------------------------------------------------
# Optimizer subclasses written for higher (copied from its own) call these module-level
# helpers, with higher's argument order: an optional coefficient first, as in the deprecated
# ``torch.add(tensor, value, other)``. They compute exactly what higher's did (one product,
# then one sum), so such subclasses reproduce their old numbers.


def _add(tensor: torch.Tensor, a1: Any, a2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``tensor + a1``, or ``tensor + a1 * a2`` when ``a2`` is given (``a1`` the coefficient)."""
    if a2 is None:
        return tensor + 1.0 * a1
    return tensor + a1 * a2


def _addcdiv(
    tensor: torch.Tensor, a1: Any, a2: torch.Tensor, a3: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``tensor + a1 / a2``, or ``tensor + a1 * (a2 / a3)`` when ``a3`` is given."""
    if a3 is None:
        return tensor + 1.0 * (a1 / a2)
    return tensor + a1 * (a2 / a3)


def _addcmul(
    tensor: torch.Tensor, a1: Any, a2: torch.Tensor, a3: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``tensor + a1 * a2``, or ``tensor + a1 * a2 * a3`` when ``a3`` is given."""
    if a3 is None:
        return tensor + 1.0 * a1 * a2
    return tensor + a1 * a2 * a3


def _module_parameters(fmodel: Any, reference_params: List[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors whose order ``step``'s fast weights follow.

    The patched module's own parameters (as resolved at patch time) when ``reference_params``
    are among them, so a subset is placed by identity; otherwise ``reference_params``.

    Raises:
        ValueError: some reference parameters belong to the patched module and some do not.
    """
    root = getattr(fmodel, "_root", None)
    originals = getattr(getattr(root, "_plan", None), "params", None)
    if not originals:
        return reference_params
    own = {id(p) for p in originals}
    found = [id(p) in own for p in reference_params]
    if not any(found):
        return reference_params
    if not all(found):
        i = found.index(False)
        raise ValueError(
            f"reference_params[{i}] (shape {tuple(reference_params[i].shape)}) is not a "
            "parameter of the patched module, but others are: pass parameters of the module "
            "that was patched (all of them, or the trainable ones)"
        )
    return list(originals)
