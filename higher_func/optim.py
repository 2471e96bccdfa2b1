"""Differentiable optimizers: ``torch.optim`` steps that stay on the autograd tape.

Every optimizer's update is one pure function in ``higher_func._rules`` (tensors in, tensors
out, no in-place writes). The classes here only translate what a ``torch.optim`` optimizer
knows (parameter groups, hyperparameters, state) and what higher's API adds (``override``,
``grad_callback``, patched modules) into calls of that rule. ``Differentiable<Name>`` is made
here for every entry of ``OPTIMIZERS`` (``torch.optim`` class -> rule, in ``_rules``). This
module is the public surface; the mechanism lives in private modules, one idea each:
``_overrides`` (checking ``override=``), ``_state`` (state to and from ``torch.optim``),
``_hyperparams`` (trainable hyperparameters), ``_numerics`` (the numerics switch) and
``_checks`` (argument checks shared with ``patch``). Where a rule has a multi-tensor variant
(SGD, Adam, AdamW), a step that nothing is differentiated through (or any step of an
optimizer built with ``foreach=True``) calls it once per parameter group instead of once per
weight: one autograd node per operation for the group, the same values (see ``_rules`` and
``DifferentiableOptimizer._multi_tensor``).

Example:
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
    >>> fmodel = higher_func.monkeypatch(model, copy_initial_weights=False)
    >>> diffopt = get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    >>> for _ in range(3):
    ...     new_weights = diffopt.step(fmodel(torch.randn(8, 3)).pow(2).mean())
    >>> fmodel(torch.randn(8, 3)).sum().backward()  # through all three Adam steps

Numerics: by default every step rounds as today's ``torch.optim`` does. To reproduce results
obtained with higher 0.2.1 bit for bit (its SGD rounds ``p - lr * g`` twice, its Adam adds
``eps`` before the bias correction, and so on), switch to higher's numerics without touching
the legacy code, with the environment variable ``HIGHER_FUNC_NUMERICS=higher`` (read at
import; ``torch`` or empty is the default, anything else an error), or in code::

    higher_func.optim.set_numerics("higher")      # from now on
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
from typing import Any, Callable, DefaultDict, Dict, Iterable, List, Optional, Sequence, Type

import torch

from . import _compile, _numerics, _rules
from . import patch as _patch
from ._batching import check_num_tasks
from ._checks import check_bool, check_task
from ._compat import foreach_differentiable, is_compiling, pytree
from ._hyperparams import apply_trainable_opt_params, get_trainable_opt_params
from ._numerics import get_numerics, numerics, set_numerics
from ._overrides import (
    OverrideType,
    as_scalar_if_single,
    broadcast_per_task,
    check_override,
    has_per_task,
)
from ._rules import OPTIMIZERS, RULES, UpdateRule
from ._state import export_state, import_state, to_python, unstacked_shape

_OverrideType = OverrideType  # higher's name, kept for code that annotates with it
_GradCallbackType = Callable[[List[Optional[torch.Tensor]]], List[Optional[torch.Tensor]]]
_GroupedGradsType = List[List[Optional[torch.Tensor]]]
_StateType = List[DefaultDict[int, Any]]
_GradClosureType = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "OPTIMIZERS",
    "RULES",
    "UpdateRule",
    "DifferentiableOptimizer",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
    "numerics",
    "set_numerics",
    "get_numerics",
]


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
            if other.state:  # (a fresh SGD or Adam has none: skip hashing every tensor)
                tensor_step = _numerics.get_numerics() == "higher"  # as higher imported it
                for i, p in enumerate(group["params"]):
                    if other.state.get(p):
                        self.state[g][i] = import_state(
                            other.state[p], device, self.num_tasks, tensor_step
                        )
        # The options the copied optimizer's torch.optim class has. A group may hold a key its
        # torch.optim ignores (``maximize`` in torch 2.0's NAdam, written into a group by
        # hand): the rule ignores it too, and takes its default, as that torch.optim does.
        self._options = frozenset(other.defaults)
        self._num_params = len(fast_weights)
        self._one_group_in_order = self._group_to_param_list == [list(range(len(fast_weights)))]
        # Whether step()'s fast weights are the patched module's, in its order and shapes.
        self._follows_module = fast_weights is not reference_params and fmodel is not None
        self._shapes = [p.shape for p in fast_weights]
        self._stacked_shapes = [
            s if self.num_tasks is None else torch.Size((self.num_tasks, *s)) for s in self._shapes
        ]
        if override is not None:
            self._apply_override(override)
        self._grad_callback = grad_callback
        self._fmodel = fmodel
        self._track_higher_grads = check_bool("track_higher_grads", track_higher_grads)
        self._first_order = check_bool("first_order", first_order)

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
        from_module = params is None
        params = self._current_params(params)
        self._check_loss(loss)
        grads = self._gradients(loss, params)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = _checked_gradients(callback(grads), params, self._label)
        # The update itself is a transaction too: if a rule or the patched module raises
        # (an override of the wrong type, KeyboardInterrupt...), groups and state roll back.
        saved_groups = [dict(group) for group in self.param_groups]
        if type(self)._update is DifferentiableOptimizer._update:
            # The rules return new per-parameter state dicts and never edit one in place.
            saved_state = [dict(states) for states in self.state]
        else:  # higher's subclasses write into them
            saved_state = [{i: dict(s) for i, s in states.items()} for states in self.state]
        try:
            if override is not None:
                self._apply_override(override)
            new_params = self._apply_updates(params, grads)
            if self._fmodel is not None:
                self._record(params, new_params, from_module)
        except BaseException:
            for group, saved in zip(self.param_groups, saved_groups):
                group.clear()
                group.update(saved)
            for states, saved_states in zip(self.state, saved_state):
                states.clear()
                states.update(saved_states)
            raise
        return new_params

    def _record(
        self, params: List[torch.Tensor], new_params: List[torch.Tensor], from_module: bool
    ) -> None:
        """Make ``new_params`` the patched module's fast weights.

        The rules keep every shape, device and (unless a tensor hyperparameter promotes it)
        dtype, so the results of updating the module's own fast weights need none of
        ``update_params``' checks: they go through the module's unchecked ``_record``. Weights
        passed to ``step(params=...)``, and modules without ``_record`` (higher's own), take
        the checked way.
        """
        record = getattr(self._fmodel, "_record", None)
        if (
            record is not None
            and from_module
            and all(new.dtype == old.dtype for new, old in zip(new_params, params))
        ):
            record(new_params)
        else:
            self._fmodel.update_params(new_params)  # type: ignore[union-attr]

    def _current_params(self, params: Optional[Iterable[torch.Tensor]]) -> List[torch.Tensor]:
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError(
                    "step() needs params= when the optimizer has no patched module with fast "
                    "weights (pass fmodel= when creating it, or params= to step)"
                )
            params = self._fmodel.fast_params
            if self._follows_module:
                return list(params)  # the module's own weights, checked when they were set
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
        if self._stacked_shapes == [getattr(p, "shape", None) for p in params] and all(
            isinstance(p, torch.Tensor) for p in params
        ):
            return params
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
        tree = getattr(self._fmodel, "_hf_tree", None)
        names = None if tree is None else tree.param_names
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
        if len(found) == len(params):
            return list(found)
        for i, g in zip(trainable, found):
            grads[i] = g
        return grads

    def _apply_updates(
        self, params: List[torch.Tensor], grads: List[Optional[torch.Tensor]]
    ) -> List[torch.Tensor]:
        if self._one_group_in_order:  # the usual case: nothing to regroup
            group = self.param_groups[0]
            group["params"] = list(params)
            self._update([grads])
            new_params = list(group["params"])
        else:
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
            # New leaves; while compiling, in the form Dynamo can return (see new_leaf).
            leaf = _compile.new_leaf if is_compiling() else _new_leaf
            new_params = [leaf(p, p.requires_grad) for p in new_params]
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
        mode = _numerics.get_numerics()
        update = rule.select(mode)
        for index, (group, grads, states) in enumerate(
            zip(self.param_groups, grouped_grads, self.state)
        ):
            hyper = {k: group[k] for k in rule.hyperparameters if k in group and k in self._options}
            if any(v is None for v in hyper.values()):
                unset = [k for k, v in hyper.items() if v is None]
                raise TypeError(
                    f"parameter group {index} has {unset[0]}=None: give it a value with "
                    f"override={{{unset[0]!r}: [value]}} (when creating the optimizer or in "
                    "step())"
                )
            # The task count when some hyperparameter holds one value per task, else None.
            per_task = self.num_tasks
            if per_task is not None and not has_per_task(hyper, per_task):
                per_task = None
            params = group["params"]
            # One multi-tensor call for the group where the rule has one and the group takes
            # it (see _multi_tensor); per-task values need per-tensor broadcasting.
            update_all = None
            if per_task is None and self._multi_tensor(group):
                update_all = rule.select_foreach(mode, hyper)
            if update_all is not None:
                active = [i for i, g in enumerate(grads) if g is not None]
                if len(active) == len(grads):  # (the usual case: no gathering)
                    results = update_all(params, grads, [states[i] for i in active], **hyper)
                elif active:
                    results = update_all(
                        [params[i] for i in active],
                        [grads[i] for i in active],
                        [states[i] for i in active],
                        **hyper,
                    )
                else:
                    continue
                for i, p, s in zip(active, *results):
                    params[i], states[i] = p, s
                continue
            for i, g in enumerate(grads):
                if g is not None:
                    h = hyper
                    if per_task is not None:
                        h = broadcast_per_task(hyper, params[i].dim(), per_task)
                    params[i], states[i] = update(params[i], g, states[i], **h)

    def _multi_tensor(self, group: Dict[str, Any]) -> bool:
        """Whether ``group`` may step with its rule's multi-tensor variant.

        As its ``foreach`` option says when the optimizer was built with one; by default only
        for steps nothing is differentiated through (``track_higher_grads=False``). In torch
        2.13 every multi-tensor (``foreach``) op saves its input lists for backward, gradients
        included, where the single-tensor ops save none: tracked, the multi-tensor steps kept
        a copy of every step's gradients alive until the meta-backward (peak memory of a W1
        meta-step +49%, of a W3 one +73%) for a faster legacy loop (W3, Adam: 1.48x higher's
        speed instead of 1.18x; docs/benchmarks.md).
        torch 2.0 cannot differentiate those ops at all, so there tracked steps always take the
        single-tensor rule.
        """
        choice = group.get("foreach")
        if choice is not None:
            return bool(choice) and (not self._track_higher_grads or foreach_differentiable())
        return not self._track_higher_grads

    # -- overrides ---------------------------------------------------------------------------------
    def _check_override(self, override: Any) -> _OverrideType:
        group_shapes = [[self._shapes[i] for i in m] for m in self._group_to_param_list]
        return check_override(override, self.param_groups, self.num_tasks, group_shapes)

    def _apply_override(self, override: _OverrideType) -> None:
        override = self._check_override(override)
        for key, values in override.items():
            for g, group in enumerate(self.param_groups):
                value = values[0] if len(values) == 1 else values[g]
                # A one-element tensor of any shape is one value: as a 0-dim tensor it
                # broadcasts without changing the shape of the weights it scales.
                group[key] = as_scalar_if_single(value)

    # -- state export ------------------------------------------------------------------------------
    def state_dict(self, task: Optional[int] = None) -> Dict[str, Any]:
        """The state in ``torch.optim``'s format, to continue with an ordinary optimizer.

        Args:
            task: for a batched optimizer, which task's state to export (required then).

        Returns:
            ``{"state": ..., "param_groups": ...}`` as ``torch.optim.Optimizer.state_dict``
            makes it. Tensor hyperparameters (learned overrides) are exported as Python
            floats; state tensors are detached copies.

        Raises:
            ValueError: ``task`` is missing for a batched optimizer, given for another, or out
                of range.
            TypeError: ``task`` is not an int.

        Example:
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            >>> fmodel = higher_func.monkeypatch(model)
            >>> diffopt = get_diff_optim(opt, model.parameters(), fmodel=fmodel)
            >>> _ = diffopt.step(fmodel(torch.randn(8, 3)).pow(2).mean())
            >>> opt.load_state_dict(diffopt.state_dict())  # continue with torch.optim
            >>> sorted(opt.state[model.weight])
            ['momentum_buffer']
        """
        check_task(task, self.num_tasks, "optimizer")
        state: Dict[int, Dict[str, Any]] = {}
        groups = []
        start = 0
        for group, group_state in zip(self.param_groups, self.state):
            count = len(group["params"])
            for i in range(count):
                if group_state.get(i):
                    shape = unstacked_shape(group["params"][i], self.num_tasks)
                    state[start + i] = export_state(group_state[i], task, self.num_tasks, shape)
            hyper = {
                k: to_python(v if task is None else _hyper_of_task(v, task, self.num_tasks, group))
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
            "{" + ", ".join(f"{k}={to_python(v)!r}" for k, v in g.items() if k != "params") + "}"
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


def _hyper_of_task(value: Any, task: int, num_tasks: Optional[int], group: Dict[str, Any]) -> Any:
    """Task ``task``'s value of a hyperparameter, per task exactly where the step treats it
    so: a ``[T]`` tensor (one value per task), or a tensor with as many dims as a stacked
    ``[T, *shape]`` weight of the group and ``T`` along the first (one element per task).
    A tensor that broadcasts over the task dim (a ``(4, 3)`` lr for ``(4, 3)`` weights, also
    when ``T`` is 4) is shared and exported whole: its shape is never read as a task count."""
    dims = {p.dim() for p in group["params"] if isinstance(p, torch.Tensor)}

    def select(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != num_tasks:
            return x
        return x[task] if x.dim() == 1 or x.dim() in dims else x

    return pytree.tree_map(select, value)


def _num_tasks(num_tasks: Optional[int], fmodel: Any) -> Optional[int]:
    from_model = getattr(fmodel, "num_tasks", None) if fmodel is not None else None
    if num_tasks is None:
        return from_model
    check_num_tasks(num_tasks)
    if fmodel is not None and from_model != num_tasks:
        raise ValueError(f"num_tasks={num_tasks} but the patched module has {from_model}")
    return num_tasks


class DifferentiableSGD(DifferentiableOptimizer):
    """Differentiable ``torch.optim.SGD`` (rule ``sgd``, higher's ``sgd_higher``)."""

    rule = OPTIMIZERS[torch.optim.SGD]


class DifferentiableAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adam`` (rule ``adam``, higher's ``adam_higher``)."""

    rule = OPTIMIZERS[torch.optim.Adam]


class DifferentiableAdamW(DifferentiableOptimizer):
    """Differentiable ``torch.optim.AdamW`` (rule ``adamw``; not in higher)."""

    rule = OPTIMIZERS[torch.optim.AdamW]


class DifferentiableAdadelta(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adadelta`` (rule ``adadelta``, higher's ``adadelta_higher``)."""

    rule = OPTIMIZERS[torch.optim.Adadelta]


class DifferentiableAdagrad(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adagrad`` (rule ``adagrad``, higher's ``adagrad_higher``)."""

    rule = OPTIMIZERS[torch.optim.Adagrad]


class DifferentiableAdamax(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adamax`` (rule ``adamax``, higher's ``adamax_higher``)."""

    rule = OPTIMIZERS[torch.optim.Adamax]


class DifferentiableASGD(DifferentiableOptimizer):
    """Differentiable ``torch.optim.ASGD`` (rule ``asgd``, higher's ``asgd_higher``)."""

    rule = OPTIMIZERS[torch.optim.ASGD]


class DifferentiableRMSprop(DifferentiableOptimizer):
    """Differentiable ``torch.optim.RMSprop`` (rule ``rmsprop``, higher's ``rmsprop_higher``).

    Differs from higher: no warning about gradient correctness at construction (the rule
    has no NaN-masking hook to warn about)."""

    rule = OPTIMIZERS[torch.optim.RMSprop]


class DifferentiableRprop(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Rprop`` (rule ``rprop``, higher's ``rprop_higher``).

    Differs from higher: no warning at construction that meta-gradients through the sign
    of the gradient are zero (they are, as in higher)."""

    rule = OPTIMIZERS[torch.optim.Rprop]


class DifferentiableNAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.NAdam`` (rule ``nadam``; not in higher)."""

    rule = OPTIMIZERS[torch.optim.NAdam]


class DifferentiableRAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.RAdam`` (rule ``radam``; not in higher)."""

    rule = OPTIMIZERS[torch.optim.RAdam]


_OptMappingType = Dict[type, Type[DifferentiableOptimizer]]

#: ``torch.optim`` class -> its differentiable class, as in higher: ``get_diff_optim`` looks
#: the optimizer's type up here and ``register_optim`` adds to it. Built from the registry
#: ``higher_func._rules.OPTIMIZERS``: an entry without its class above fails here, at import,
#: and ``tests/test_surface.py`` checks that each class runs its entry's rule.
_opt_mapping: _OptMappingType = {
    opt_type: globals()[f"Differentiable{opt_type.__name__}"] for opt_type in OPTIMIZERS
}
__all__ += [cls.__name__ for cls in _opt_mapping.values()]


def _differentiable_type(opt_type: Any) -> Type[DifferentiableOptimizer]:
    if not isinstance(opt_type, type):
        raise TypeError(
            f"expected a torch.optim.Optimizer class, got {type(opt_type).__name__} "
            f"{opt_type!r} (pass the class itself, e.g. torch.optim.SGD)"
        )
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
    if isinstance(opt, type):
        raise TypeError(
            f"get_diff_optim takes an optimizer instance, got the class {opt.__name__}: build "
            f"it first ({opt.__name__}(model.parameters(), ...)), or use "
            f"create_diff_optim({opt.__name__}, opt_kwargs, fmodel=fmodel)"
        )
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"get_diff_optim takes a torch.optim.Optimizer, got {type(opt).__name__} {opt!r}"
        )
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
    if isinstance(opt_type, torch.optim.Optimizer):
        raise TypeError(
            "create_diff_optim takes an optimizer class, got an instance of "
            f"{type(opt_type).__name__}: use get_diff_optim(opt, model.parameters(), "
            "fmodel=fmodel) for an existing optimizer"
        )
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


def _get_mask_closure(mask: torch.Tensor) -> _GradClosureType:
    """A gradient hook zeroing the entries where ``mask`` is True, and registering itself on
    the gradient too when that gradient requires grad (so higher orders are masked as well)."""

    def closure(grad: torch.Tensor) -> torch.Tensor:
        grad = torch.where(mask, torch.zeros_like(grad), grad)
        if grad.requires_grad:
            grad.register_hook(_get_mask_closure(mask))
        return grad

    return closure


def _maybe_mask(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the gradients reaching ``tensor`` where ``mask`` is True (if it requires grad).

    higher's built-in optimizers hid the NaN of ``sqrt'(0)`` this way; its subclasses copied
    from them still call it, so it is kept, with the same effect. The rules here need no hook
    (see ``_rules._safe_sqrt``), which is also what lets them run under ``torch.compile``.
    """
    if tensor.requires_grad:
        tensor.register_hook(_get_mask_closure(mask))


def _recursive_apply(replacement: Any, target: Any) -> Any:
    """``replacement`` written into ``target``, as higher's ``apply_trainable_opt_params``
    wrote a learned value back: a tensor into a number becomes that number's type (an ``int``
    target truncates it, as in higher), a tensor into a tensor is copied into the target's
    storage (the target returned), and lists, tuples, dicts and sets are matched item by item.

    Raises:
        ValueError: ``replacement`` does not fit the structure or type of ``target``.
    """
    is_container = isinstance(target, (list, tuple, dict, set))
    if not isinstance(replacement, type(target)):
        if isinstance(replacement, torch.Tensor) and not is_container:
            return type(target)(replacement.item())
        raise ValueError(
            f"cannot write a {type(replacement).__name__} into {target!r}, a "
            f"{type(target).__name__}"
        )
    if isinstance(target, torch.Tensor):
        target.data = replacement.to(target.device).data
        return target
    if isinstance(target, dict):
        pairs = zip(replacement.values(), target.items())
        return type(target)((k, _recursive_apply(r, t)) for r, (k, t) in pairs)
    if is_container:
        return type(target)(_recursive_apply(r, t) for r, t in zip(replacement, target))
    raise ValueError(
        f"cannot write a {type(replacement).__name__} into a {type(target).__name__}: "
        "expected tensors, or lists, tuples, dicts or sets of them"
    )


def _module_parameters(fmodel: Any, reference_params: List[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors whose order ``step``'s fast weights follow.

    The patched module's own parameters (as resolved at patch time) when ``reference_params``
    are among them, so a subset is placed by identity; otherwise ``reference_params``.

    Raises:
        ValueError: some reference parameters belong to the patched module and some do not.
    """
    tree = getattr(fmodel, "_hf_tree", None)  # None for higher's own patched modules
    originals = None if tree is None else tree.params
    if not originals:
        return reference_params
    if len(reference_params) == len(originals) and all(
        r is o for r, o in zip(reference_params, originals)
    ):
        return list(originals)  # the usual case, checked without a set
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


def _new_leaf(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return tensor.detach().requires_grad_(requires_grad)
