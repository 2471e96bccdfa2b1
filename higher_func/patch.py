"""Patched modules: run a module's own code on fast weights it does not own.

``monkeypatch(model)`` returns a light proxy around ``model`` (never a copy or a subclass of
its class). The proxy holds the fast weights (a list in ``model.parameters()`` order, with
their history while tracking higher-order gradients), its own copies of the buffers and its
own training flags; each call lends them to ``model`` for the duration of the call and then
restores what ``model`` held, also when the forward raises.

Example:
    >>> model = torch.nn.Linear(3, 1)
    >>> fmodel = monkeypatch(model, copy_initial_weights=False)
    >>> loss = fmodel(torch.randn(8, 3)).pow(2).mean()
    >>> grads = torch.autograd.grad(loss, fmodel.parameters(), create_graph=True)
    >>> fmodel.update_params([p - 0.1 * g for p, g in zip(fmodel.parameters(), grads)])
    >>> fmodel(torch.randn(8, 3)).sum().backward()  # gradients reach model.weight, model.bias

Differs from higher: the patched module is a plain object, not an ``nn.Module``; the methods
``nn.Module`` itself defines that would act on the original module (``to``, ``cuda``,
``double``, ``apply``, ``load_state_dict``...) are refused with an error saying what to do
instead; ``make_functional`` copies the buffers at once, so ``buffer_sync`` is only needed to
refresh them.
"""

from __future__ import annotations

import inspect as _inspect
import typing as _typing
import warnings as _warnings
import weakref as _weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch as _torch
from torch import nn as _nn

from ._batching import TaskBatch as _TaskBatch
from ._lending import SlotPlan as _SlotPlan
from ._lending import _is_compiling

_Params = Union[Sequence[_torch.Tensor], Mapping[str, _torch.Tensor]]
_EncapsulatorType = Optional[Callable[["_MonkeyPatchBase", _nn.Module], None]]

__all__ = ["monkeypatch", "make_functional", "buffer_sync"]


class _MonkeyPatchBase:
    """What every patched module and every view of one of its submodules is an instance of.

    A patched module reads like the module it wraps: calls, submodules (``fmodel.encoder``),
    custom methods (``fmodel.embed(x)``) and tensor attributes (``fmodel.fc.weight``) all see
    the current fast weights. Other attributes are read from the wrapped module.

    Differs from higher: it is a plain object, not a ``torch.nn.Module`` subclass, so that
    Dynamo can build one inside a compiled meta-step (``nn.Module.__init__`` cannot be traced).
    """

    # The wrapped (sub)module, the root patched module that owns the state, and the dotted
    # path from the root's module to the wrapped one ("" for the root itself).
    _module: _nn.Module
    _root: "_PatchedModule"
    _prefix: str

    def _setup(self, module: _nn.Module, prefix: str) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_prefix", prefix)

    def _owner(self) -> Optional["_PatchedModule"]:
        """The root, or None while the root is still being constructed."""
        root = self.__dict__.get("_root", self)
        return root if "_index" in root.__dict__ else None

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(
            "deepcopy of a patched module is not supported (its fast weights are part of an "
            "autograd graph); save it with fmodel.state_dict(), or patch the module again and "
            "update_params([p.detach().clone() for p in fmodel.parameters()])"
        )

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, *args: Any, params: Optional[_Params] = None, **kwargs: Any) -> Any:
        """Call the wrapped module (its forward hooks included) on the fast weights.

        Args:
            params: optional new fast weights for the whole patched module (a list in
                ``module.parameters()`` order, or a name->tensor dict). As in higher, they
                become the current fast weights.
        """
        return self._root._run(self._module, params, args, kwargs)

    def forward(self, *args: Any, params: Optional[_Params] = None, **kwargs: Any) -> Any:
        """Like calling the patched module, without the wrapped module's hooks."""
        return self._root._run(self._module.forward, params, args, kwargs)

    # -- reading the wrapped module -----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails, i.e. for the wrapped module's own names.
        root = self._owner()
        if name.startswith("__") or root is None:
            raise AttributeError(name)  # a dunder, or a lookup while still being constructed
        module = self.__dict__["_module"]
        qualified = self._prefix + name
        tensor = root._current_tensor(qualified)
        if tensor is not None:
            return tensor
        class_attr = getattr(type(module), name, None)
        if class_attr is not None and class_attr is getattr(_nn.Module, name, None):
            raise AttributeError(
                f"a patched module has no {name}(): nn.Module's own methods would act on the "
                "original module, not on the fast weights. Move or convert the module before "
                "patching it (monkeypatch(model.to(device)), or pass device=), and save "
                "adapted weights with state_dict()"
            )
        if isinstance(class_attr, property):
            # A property (a parametrized weight among them) computes from the weights.
            return root._run(lambda: getattr(module, name), None, (), {})
        if isinstance(module, _nn.ModuleDict) and name in ("keys", "items", "values"):
            return getattr(dict(self.named_children()), name)
        if _inspect.isfunction(class_attr) and name not in module.__dict__:
            # A method of the module's class. Decided from the class, not by comparing the
            # bound method's __self__, which Dynamo does not preserve while tracing.
            def on_fast_weights(*args: Any, **kwargs: Any) -> Any:
                return root._run(getattr(module, name), None, args, kwargs)

            on_fast_weights.__name__ = name
            on_fast_weights.__doc__ = class_attr.__doc__
            return on_fast_weights
        attr = getattr(module, name)
        if isinstance(attr, _nn.Module):
            return self._view(name, attr)
        return attr

    def _view(self, name: str, submodule: _nn.Module) -> "_PatchedView":
        if _is_compiling():  # Dynamo cannot build a weak dictionary; identity is moot there
            return _PatchedView(submodule, self._root, self._prefix + name + ".")
        # Views are cached weakly: a strong cache (root -> view -> root) would be a reference
        # cycle keeping every fast weight alive until the cyclic collector happens to run.
        views = self.__dict__.get("_views")
        if views is None:
            views = self.__dict__["_views"] = _weakref.WeakValueDictionary()
        view = views.get(name)
        if view is None or view._module is not submodule:
            view = _PatchedView(submodule, self._root, self._prefix + name + ".")
            views[name] = view
        return view

    # Containers (Sequential, ModuleList, ModuleDict) hand out views of their children, never
    # the children themselves, which would run on the original weights.
    def named_children(self) -> Iterator[Tuple[str, "_PatchedView"]]:
        return iter([(n, self._view(n, m)) for n, m in self._module.named_children()])

    def children(self) -> Iterator["_PatchedView"]:
        return (view for _, view in self.named_children())

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "_MonkeyPatchBase"]]:
        """``(name, view)`` for this patched module and every submodule, depth first."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(prefix + ("." if prefix else "") + name)

    def modules(self) -> Iterator["_MonkeyPatchBase"]:
        return (module for _, module in self.named_modules())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` of the fast weights that are leaves (others never get one)."""
        for p in self.parameters():
            if p.is_leaf and p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def __getitem__(self, key: Any) -> Any:
        item = self._module[key]
        if not isinstance(item, _nn.Module):
            return item
        for name, child in self._module.named_children():
            if child is item:
                return self._view(name, child)
        raise TypeError(
            f"{type(self._module).__name__}[{key!r}] is not a direct child; slicing a patched "
            "container is not supported (index its children one by one)"
        )

    def __bool__(self) -> bool:  # `if fmodel:` must not fall back to __len__
        return True

    def __len__(self) -> int:
        return len(self._module)

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self._module, _nn.ModuleDict):
            return iter(self._module)
        return self.children()

    def __setattr__(self, name: str, value: Any) -> None:
        # Assigning a parameter name replaces that fast weight, as in higher; anything else is
        # a plain attribute of the proxy (never registered, never lent to the module).
        root = self._owner()
        index = {} if root is None else root._index
        qualified = self._prefix + name
        if qualified in index:
            params = list(root._params_at(None))
            params[root._index[qualified]] = value
            root.update_params(params)
        else:
            object.__setattr__(self, name, value)

    # -- parameters, buffers, modes -----------------------------------------------------------
    def parameters(
        self, recurse: bool = True, time: Optional[int] = None
    ) -> Iterator[_torch.Tensor]:
        """The fast weights of this (sub)module, in ``module.parameters()`` order.

        Args:
            recurse: kept for ``nn.Module`` compatibility; as in higher, ``False`` still
                yields the weights of all submodules, with a warning.
            time: which step's weights: ``None`` (or -1) for the latest, ``k`` for the weights
                after ``k`` updates (0: the initial ones).

        Raises:
            ValueError: ``time`` names a past step while not tracking higher-order gradients,
                or an unknown step; or the patched module has no fast weights yet.
        """
        return (p for _, p in self.named_parameters(recurse=recurse, time=time))

    def named_parameters(
        self,
        prefix: str = "",
        recurse: bool = True,
        remove_duplicate: bool = True,
        time: Optional[int] = None,
    ) -> Iterator[Tuple[str, _torch.Tensor]]:
        """``(name, fast weight)`` pairs, names relative to this (sub)module."""
        if not recurse:
            _warnings.warn(
                "parameters(recurse=False) on a patched module still yields the fast weights "
                "of all its submodules",
                stacklevel=2,
            )
        params = self._root._params_at(time)
        return self._own_named(self._root._plan.param_names, params, prefix)

    def buffers(self, recurse: bool = True) -> Iterator[_torch.Tensor]:
        """The patched module's own copies of the buffers, in ``module.buffers()`` order."""
        return (b for _, b in self.named_buffers())

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[Tuple[str, _torch.Tensor]]:
        """``(name, buffer)`` pairs of the patched module's own buffer copies."""
        return self._own_named(self._root._plan.buffer_names, self._root._buffers_list, prefix)

    def _own_named(self, names, tensors, prefix):
        start = self._prefix
        return iter(
            [
                (prefix + ("." if prefix else "") + name[len(start) :], tensor)
                for name, tensor in zip(names, tensors)
                if name.startswith(start)
            ]
        )

    def train(self, mode: bool = True) -> "_MonkeyPatchBase":
        """Set the training flag of the wrapped (sub)module and its children, for this patched
        module only: the original module's flags are untouched."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {type(mode).__name__}")
        root = self._root
        for m in self._module.modules():
            root._modes[root._module_index[id(m)]] = mode
        return self

    def eval(self) -> "_MonkeyPatchBase":
        return self.train(False)

    @property
    def training(self) -> bool:
        root = self._root
        return root._modes[root._module_index[id(self._module)]]

    @training.setter
    def training(self, mode: bool) -> None:
        self.train(mode)

    def state_dict(
        self,
        *args: Any,
        prefix: str = "",
        keep_vars: bool = False,
        task: Optional[int] = None,
        **kwargs: Any,
    ):
        """The wrapped module's ``state_dict`` with the fast weights and buffer copies in place
        of its own tensors: it loads into the original module's class (to save an adapted
        model).

        Args:
            prefix, keep_vars: as in ``nn.Module.state_dict``.
            task: with ``num_tasks``, which task's weights to export (required then).

        Raises:
            ValueError: ``task`` is missing (or out of range) for a batched patched module, or
                given for one that is not batched.
        """
        if args or kwargs:
            raise TypeError(
                "state_dict() of a patched module takes only prefix=, keep_vars= and task="
            )
        root = self._root
        if (task is None) != (root.num_tasks is None):
            raise ValueError(
                "state_dict(task=t) selects one task of a batched patched module; it is "
                "required with num_tasks and meaningless without"
            )
        if task is not None and not 0 <= task < root.num_tasks:
            raise ValueError(f"task {task} is out of range for num_tasks={root.num_tasks}")
        current = {id(p): q for p, q in zip(root._plan.params, root._params_at(None))}
        current.update({id(b): c for b, c in zip(root._plan.buffers, root._buffers_list)})
        with root._plan.locked():  # another thread may be lending into the module right now
            state = self._module.state_dict(prefix=prefix, keep_vars=True)
        for key, tensor in state.items():
            if id(tensor) in current:
                tensor = current[id(tensor)]
                tensor = tensor if task is None else tensor[task]
            state[key] = tensor if keep_vars else tensor.detach()
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._module!r})"

    def __dir__(self):
        return sorted(set(object.__dir__(self)) | set(dir(self._module)))


class _PatchedView(_MonkeyPatchBase):
    """A submodule of a patched module, called on the root's current fast weights."""

    def __init__(self, module: _nn.Module, root: "_PatchedModule", prefix: str) -> None:
        self._setup(module, prefix)
        object.__setattr__(self, "_root", root)


class _PatchedModule(_MonkeyPatchBase):
    """The root patched module: owns the fast weights, buffer copies and training flags."""

    def __init__(
        self,
        module: _nn.Module,
        num_tasks: Optional[int] = None,
        device: Optional[_torch.device] = None,
    ) -> None:
        self._setup(module, "")
        plan = _SlotPlan(module)
        self._plan = plan
        self._tasks = None if num_tasks is None else _TaskBatch(num_tasks, module)
        self._index = {name: i for i, name in enumerate(plan.param_names)}
        self._buffer_index = {name: i for i, name in enumerate(plan.buffer_names)}
        self._shapes = [self._stack_shape(p.shape) for p in plan.params]
        self._device = None if device is None else _torch.device(device)
        self._buffers_list: List[_torch.Tensor] = [self.stack(b.detach()) for b in plan.buffers]
        self._modes: List[bool] = [m.training for m in plan.modules]
        self._module_index = {id(m): i for i, m in enumerate(plan.modules)}
        self._fast_params: Optional[List[List[_torch.Tensor]]] = None
        self._track_higher_grads = True

    @property
    def _root(self) -> "_PatchedModule":
        return self  # a property, not an attribute: an attribute would be a reference cycle

    # -- tasks ---------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> Optional[int]:
        """The number of tasks whose fast weights are stacked (``None``: not batched)."""
        return None if self._tasks is None else self._tasks.size

    def _stack_shape(self, shape: _torch.Size) -> _torch.Size:
        return shape if self._tasks is None else _torch.Size((self._tasks.size, *shape))

    def stack(self, tensor: _torch.Tensor) -> _torch.Tensor:
        """``tensor`` repeated once per task (a real copy), or itself when not batched."""
        return tensor.clone() if self._tasks is None else self._tasks.stack(tensor)

    # -- fast weights --------------------------------------------------------------------------
    @property
    def fast_params(self) -> Optional[List[_torch.Tensor]]:
        """The latest fast weights, in ``module.parameters()`` order (``None`` before any)."""
        return None if self._fast_params is None else self._fast_params[-1]

    @fast_params.setter
    def fast_params(self, value: _Params) -> None:
        value = self._as_param_list(value)
        if self._fast_params is None or not self._track_higher_grads:
            self.__dict__["_fast_params"] = [value]  # skips __setattr__'s name lookup
        else:
            self._fast_params.append(value)

    @property
    def init_fast_params(self) -> List[_torch.Tensor]:
        """The initial fast weights (only kept while tracking higher-order gradients)."""
        if not self._track_higher_grads:
            raise ValueError(
                "initial fast weights are not kept when not tracking higher-order gradients"
            )
        return self._params_at(0)

    def update_params(self, params: _Params) -> None:
        """Make ``params`` the current fast weights (appended to the history when tracking).

        Args:
            params: a list in ``module.parameters()`` order, or a name->tensor dict.

        Raises:
            ValueError: the count, a name or a shape does not match the module's parameters.
            TypeError: an entry is not a tensor.
        """
        self.fast_params = params

    @property
    def track_higher_grads(self) -> bool:
        """Whether the history of fast weights is kept for differentiating through it."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"track_higher_grads must be a bool, got {type(value).__name__}")
        self._track_higher_grads = value

    def _params_at(self, time: Optional[int]) -> List[_torch.Tensor]:
        if self._fast_params is None:
            raise ValueError(
                "this patched module has no fast weights: pass params= to the call, or create "
                "it with monkeypatch()"
            )
        time = -1 if time is None else time
        if isinstance(time, bool) or not isinstance(time, int):
            raise TypeError(f"time must be an int step index or None, got {time!r}")
        if not self._track_higher_grads and time not in (-1, 0):
            raise ValueError(
                f"parameters(time={time}): only the latest fast weights are kept when not "
                "tracking higher-order gradients"
            )
        try:
            return self._fast_params[time]
        except IndexError:
            raise ValueError(
                f"parameters(time={time}): only {len(self._fast_params)} steps are recorded"
            ) from None

    def _as_param_list(self, params: _Params) -> List[_torch.Tensor]:
        names = self._plan.param_names
        if isinstance(params, Mapping):
            unknown = [k for k in params if k not in self._index]
            missing = [k for k in names if k not in params]
            if unknown or missing:
                raise KeyError(
                    "params dict does not match the module's parameters: "
                    f"unknown {unknown}, missing {missing}"
                )
            params = [params[k] for k in names]
        elif isinstance(params, _torch.Tensor):
            raise TypeError("params must be a list or dict of tensors, got a single tensor")
        else:
            params = list(params)
        if len(params) != len(names):
            raise ValueError(
                f"expected {len(names)} parameters (one per distinct parameter of the module, "
                f"tied weights once), got {len(params)}"
            )
        for name, p, shape, original in zip(names, params, self._shapes, self._plan.params):
            if not isinstance(p, _torch.Tensor):
                raise TypeError(f"parameter {name!r} must be a tensor, got {type(p).__name__}")
            if p.shape != shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(p.shape)}, expected {tuple(shape)}"
                )
            # Mixed dtypes or devices would be promoted or, under vmap, silently miscomputed.
            if p.dtype != original.dtype:
                raise TypeError(
                    f"parameter {name!r} has dtype {p.dtype}, expected {original.dtype} (convert "
                    "the module itself, e.g. model.double(), to change dtypes)"
                )
            device = self._device or original.device
            if not _same_device(p.device, device):
                raise ValueError(f"parameter {name!r} is on {p.device}, expected {device}")
        return params

    def _current_tensor(self, name: str) -> Optional[_torch.Tensor]:
        i = self._index.get(name)
        if i is not None:
            return self._params_at(None)[i]
        i = self._buffer_index.get(name)
        if i is not None:
            return self._buffers_list[i]
        return None

    def _run(
        self, fn: Callable[..., Any], params: Optional[_Params], args: tuple, kwargs: dict
    ) -> Any:
        if params is not None:
            self.fast_params = params
        current = self._params_at(None)
        if self._tasks is None:
            return self._plan.call(fn, current, self._buffers_list, self._modes, args, kwargs)
        out, buffers = self._tasks.call(
            self._plan, fn, current, self._buffers_list, self._modes, args, kwargs
        )
        self.__dict__["_buffers_list"] = buffers
        return out

    def __repr__(self) -> str:
        steps = (
            "no fast weights"
            if self._fast_params is None
            else (f"{len(self._fast_params)} fast weight step(s) kept")
        )
        return f"MonkeyPatched({self._module!r}) [{steps}]"


def _same_device(a: _torch.device, b: _torch.device) -> bool:
    # "cuda" (no index) stands for the current device: it matches any index of its type.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def make_functional(
    module: _nn.Module,
    encapsulator: _EncapsulatorType = None,
    num_tasks: Optional[int] = None,
    device: Optional[_torch.device] = None,
) -> _MonkeyPatchBase:
    """A patched module without fast weights: every call must pass ``params=``.

    Args:
        module: the module to wrap; it is never modified.
        encapsulator: optional ``f(fmodule, module)`` run once on the new patched module, e.g.
            to give it initial fast weights with ``fmodule.update_params``.
        num_tasks: see ``monkeypatch``.
        device: the device fast weights must be on (default: the module's).

    Returns:
        The patched module, holding copies of ``module``'s buffers.

    Raises:
        ValueError: ``module`` is already a patched module.
    """
    if isinstance(module, _MonkeyPatchBase):
        raise ValueError(
            "this module is already a patched module; patch the original module instead"
        )
    if not isinstance(module, _nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    fmodule = _PatchedModule(module, num_tasks, device)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def buffer_sync(
    module: _nn.Module, fmodule: _MonkeyPatchBase, device: Optional[_torch.device] = None
) -> None:
    """Overwrite ``fmodule``'s buffer copies with fresh copies of ``module``'s buffers.

    Raises:
        KeyError: ``module`` has a buffer the patched module does not know.
    """
    root = fmodule._root
    with root._plan.locked():  # read the module's own buffers, not ones lent by a thread
        named = list(module.named_buffers())
    for name, buffer in named:
        name = fmodule._prefix + name
        if name not in root._buffer_index:
            raise KeyError(f"buffer {name!r} is not a buffer of the patched module")
        copy = root.stack(buffer.detach())
        root._buffers_list[root._buffer_index[name]] = copy if device is None else copy.to(device)


def monkeypatch(
    module: _nn.Module,
    device: Optional[_torch.device] = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
    num_tasks: Optional[int] = None,
) -> _MonkeyPatchBase:
    """Wrap ``module`` so that it runs on fast weights that optimizers can update differentiably.

    Args:
        module: any ``torch.nn.Module``; it is never modified.
        device: optional device to cast the fast weights and buffer copies to.
        copy_initial_weights: if True, the initial fast weights are detached copies of the
            module's parameters (no gradient flows back into ``module``); if False they are
            ``module``'s parameters themselves, cloned inside the graph, so a loss on the
            adapted weights backpropagates into ``module`` (MAML).
        track_higher_grads: if True, the history of fast weights is kept so that losses can be
            differentiated through the whole unroll; if False only the latest are kept
            ("test mode").
        num_tasks: if given, run ``num_tasks`` independent copies at once: the fast weights
            and buffers are stacked ``[num_tasks, *shape]`` and every call is vmapped over the
            leading dim of its positional inputs (``in_dims=`` on a call marks inputs shared
            by all tasks, as in ``torch.vmap``). The initial weights are one tensor expanded,
            so meta-gradients of all tasks sum into ``module``'s parameters. Modules without
            vmap batching rules (RNN/LSTM/GRU and their cells, BatchNorm with
            ``momentum=None``) run a Python loop over the tasks instead, with a one-time
            ``BatchingFallbackWarning``.

    Returns:
        The patched module (a ``_MonkeyPatchBase``); call it like ``module``, optionally with
        ``params=``.

    Raises:
        ValueError: ``module`` is already patched, ``track_higher_grads`` is not a bool, or
            ``num_tasks`` is not a positive int.

    Example (batched):
        >>> fmodel = monkeypatch(model, copy_initial_weights=False, num_tasks=4)
        >>> fmodel(torch.randn(4, 10, 1)).shape  # one batch of 10 inputs per task
        torch.Size([4, 10, 1])
    """

    def encapsulator(fmodule: _MonkeyPatchBase, module: _nn.Module) -> None:
        # The module's own parameters as resolved at patch time (under the lending lock), not
        # module.parameters(), which may hold another thread's lent fast weights right now.
        originals = fmodule._root._plan.params
        if copy_initial_weights:
            params = [fmodule.stack(p.detach()).requires_grad_(p.requires_grad) for p in originals]
        elif num_tasks is None:
            params = [p.clone() for p in originals]
        else:
            # A view, not a copy: the gradient of every task's weights flows back into p.
            params = [p.expand(num_tasks, *p.shape) for p in originals]
        if device is not None:
            params = [p.to(device) for p in params]
        buffer_sync(module, fmodule, device)
        fmodule.update_params(params)

    fmodule = make_functional(module, encapsulator=encapsulator, num_tasks=num_tasks, device=device)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule


# Keep `higher.patch`'s type names importable for code that annotates with them.
_BufferType = Dict[str, Optional[_torch.Tensor]]
del _typing
