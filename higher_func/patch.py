"""Patched modules: run a module's own code on fast weights, without ever writing into it.

``monkeypatch(model)`` returns a light proxy (a plain object, never a subclass of the model's
class). At patch time it makes a shallow copy of the module tree (``higher_func._tree``): each
submodule copied once, sharing the user's code, hooks and configuration, owning its parameter,
buffer and child dictionaries and its training flag. The fast weights live in those copies, so
calling the patched module is calling the user's own forward on the copy, and the user's module
is never written, not even for the length of a call (another thread may use it meanwhile).

Submodules of a patched module are those copies: real instances of their class
(``isinstance(fmodel.encoder, Encoder)``), whose ``parameters()``, ``state_dict()``, custom
methods, generators, ``train()`` overrides and attributes all act on the fast weights. With
``num_tasks`` they are proxies instead, whose calls run once per task (vmapped).

Example:
    >>> model = torch.nn.Linear(3, 1)
    >>> fmodel = monkeypatch(model, copy_initial_weights=False)
    >>> loss = fmodel(torch.randn(8, 3)).pow(2).mean()
    >>> grads = torch.autograd.grad(loss, fmodel.parameters(), create_graph=True)
    >>> fmodel.update_params([p - 0.1 * g for p, g in zip(fmodel.parameters(), grads)])
    >>> fmodel(torch.randn(8, 3)).sum().backward()  # gradients reach model.weight, model.bias

To ``isinstance`` and to torch the patched module is an ``nn.Module`` and an instance of the
model's class, as higher's patched modules were (``type(fmodel)`` is the proxy class, never a
subclass of the model's): it can be stored as a child of another module, whose calls,
``modules()``, ``parameters()``, ``state_dict()`` and ``load_state_dict()`` reach the fast
weights as with higher.

Differs from higher: the methods of ``nn.Module`` that would convert or overwrite the
fast weights (``to``, ``cuda``, ``double``, ``load_state_dict``...) are refused with an error
saying what to do instead; ``make_functional`` copies the buffers at once, so ``buffer_sync``
is only needed to refresh them; assigning a plain tensor to a parameter name of a submodule
(``fmodel.decoder.weight = w``) raises torch's own ``TypeError`` (replace fast weights with
``update_params``, or assign on the patched module itself: ``fmodel.weight = w``).
"""

from __future__ import annotations

import collections.abc as _abc
import functools as _functools
import inspect as _inspect
import types as _types
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch as _torch
from torch import nn as _nn

from . import _compile, _reroute
from ._batching import TaskBatch as _TaskBatch
from ._batching import check_batching as _check_batching
from ._checks import UnknownKeyError, check_bool, check_task, same_device
from ._compat import is_compiling as _is_compiling
from ._legacy import HIGHER_ATTRIBUTES as _HIGHER_ATTRIBUTES
from ._legacy import _internal_attrs as _internal_attrs
from ._legacy import _make_functional as _make_functional
from ._legacy import _modify_internally as _modify_internally
from ._legacy import _ParameterPlaceholder as _ParameterPlaceholder
from ._legacy import _patched_parameters as _patched_parameters
from ._legacy import _update_patched_params as _update_patched_params
from ._task_state import Mixed as _Mixed
from ._tree import ModuleTree as _ModuleTree

_Params = Union[Sequence[_torch.Tensor], Mapping[str, _torch.Tensor]]
_EncapsulatorType = Optional[Callable[["_MonkeyPatchBase", _nn.Module], None]]

__all__ = ["monkeypatch", "make_functional", "buffer_sync", "batching", "Batching"]

# nn.Module methods that would convert, move or overwrite the fast weights in place (turning
# them into new leaves, cut off from the graph): refused on a patched module.
_REFUSED = frozenset(
    {"to", "cuda", "cpu", "xpu", "ipu", "mtia", "type", "float", "double", "half", "bfloat16"}
    | {"to_empty", "share_memory", "load_state_dict", "_apply"}
)


class _MonkeyPatchBase:
    """What every patched module is an instance of: a proxy for the patch's own copy of the
    module, holding the history of its fast weights.

    ``isinstance(fmodel, nn.Module)`` and ``isinstance(fmodel, ModelClass)`` hold (its
    ``__class__`` is the model's class), as with higher. Differs from higher: ``type(fmodel)``
    is this plain class, neither an ``nn.Module`` subclass nor a subclass of the model's class
    built per patch, so that Dynamo can build one inside a compiled meta-step; higher's own
    attributes of a patched module (``root``, ``_param_mapping``...) are read only where the
    model has no attribute of that name.
    """

    _module: _nn.Module
    _tree: _ModuleTree

    def __init__(
        self,
        module: _nn.Module,
        num_tasks: Optional[int] = None,
        device: Optional[_torch.device] = None,
        randomness: str = "different",
        batching: str = "auto",
    ) -> None:
        _check_batching(batching)
        if num_tasks is None and batching != "auto":
            raise ValueError(
                f"batching={batching!r} needs num_tasks: only a batched patched module runs "
                "tasks (pass num_tasks=T)"
            )
        compiling = _is_compiling()
        tree = _ModuleTree(module, compiling, batched=num_tasks is not None)
        state = self.__dict__
        state["_hf_module"] = module
        state["_hf_tree"] = tree
        state["_hf_compiling"] = compiling
        device = None if device is None else _torch.device(device)
        tasks = (
            None
            if num_tasks is None
            else _TaskBatch(num_tasks, module, randomness, device, batching)
        )
        state["_hf_tasks"] = tasks
        # Attention that can be differentiated twice, embeddings right under vmap.
        state["_hf_reroute"] = _reroute.install(tree.copies, tasks is not None)
        state["_hf_index"] = tree.param_index
        state["_hf_shapes"] = [self._stack_shape(p.shape) for p in tree.params]
        # As patched: converting the module afterwards (model.double()) changes its Parameters
        # in place, not the patch's fast weights or buffers.
        state["_hf_kinds"] = [(p.dtype, p.device) for p in tree.params]
        state["_hf_device"] = device
        state["_fast_params"] = None
        state["_track_higher_grads"] = True
        if tree.private_buffers and device is None:
            tree.write_buffers(tree.private_buffers)  # copy-on-write, aliasing kept
        elif tree.buffers:
            buffers = [self._stack(b.detach()) for b in tree.buffers]
            tree.write_buffers(buffers if device is None else [b.to(device) for b in buffers])

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        # isinstance(fmodel, nn.Module / the model's class) holds, as with higher's patched
        # modules, and torch accepts it as a child module; type(fmodel) stays this proxy
        # class. (Before __init__ has run, as when Dynamo builds one, it is the proxy class.)
        module = self.__dict__.get("_hf_module")
        return type(self) if module is None else type(module)

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(
            "deepcopy of a patched module is not supported (its fast weights are part of an "
            "autograd graph); save it with fmodel.state_dict(), or patch the module again and "
            "update_params([p.detach().clone() for p in fmodel.parameters()])"
        )

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, *args: Any, params: Optional[_Params] = None, **kwargs: Any) -> Any:
        """Call the module (its hooks included) on the fast weights.

        Args:
            params: optional new fast weights for the whole patched module (a list in
                ``module.parameters()`` order, or a name->tensor dict). As in higher, they
                become the current fast weights.
        """
        if params is not None:
            self.fast_params = params
        elif self._fast_params is None:
            self._params_at(None)  # raises: no fast weights yet
        if self._hf_tasks is None:
            return self._hf_tree.root(*args, **kwargs)
        return self._per_task(self._hf_tree.root, args, kwargs)

    def forward(self, *args: Any, params: Optional[_Params] = None, **kwargs: Any) -> Any:
        """Like calling the patched module, without the module's hooks."""
        if params is not None:
            self.fast_params = params
        self._params_at(None)
        if self._hf_tasks is None:
            return self._hf_tree.root.forward(*args, **kwargs)
        return self._per_task(self._hf_tree.root.forward, args, kwargs)

    def _per_task(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        tree, tasks = self._hf_tree, self._hf_tasks
        out, _ = tasks.call(
            tree, fn, self._params_at(None), tree.read_buffers(), args, kwargs, self._hf_compiling
        )
        return out

    # -- reading and writing the module ------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails, i.e. for the module's own names.
        tree = self.__dict__.get("_hf_tree")
        if name.startswith("__") or tree is None:
            raise AttributeError(name)
        _refuse(name, tree.root)
        try:
            if self._hf_tasks is None:
                return getattr(tree.root, name)
            return _batched_attr(self, tree.root, name)
        except AttributeError:
            # higher's own attributes of a patched module (root, _param_mapping...), only
            # where the module has none of that name.
            legacy = _HIGHER_ATTRIBUTES.get(name)
            if legacy is None:
                raise
            return legacy(self)

    def __setattr__(self, name: str, value: Any) -> None:
        # A parameter name replaces that fast weight, as in higher; the patch's own properties
        # (fast_params, track_higher_grads, training) set themselves; anything else is set on
        # the patch's copy of the module, where its forward sees it.
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        elif isinstance(value, _nn.Module):
            _refuse_new_module(name)
        elif name in self._hf_index:
            params = list(self._params_at(None))
            params[self._hf_index[name]] = value
            self.update_params(params)
        else:
            setattr(self._hf_tree.root, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._hf_tree.root, name)

    def __getitem__(self, key: Any) -> Any:
        return self._wrap(self._hf_tree.root[key])

    def __len__(self) -> int:
        return len(self._hf_tree.root)

    def __iter__(self) -> Iterator[Any]:
        return (self._wrap(item) for item in iter(self._hf_tree.root))

    def __contains__(self, key: Any) -> bool:
        return key in self._hf_tree.root

    def __bool__(self) -> bool:  # `if fmodel:` must not fall back to __len__
        return True

    def _wrap(self, value: Any) -> Any:
        """A submodule as the user sees it: the copy itself, or a per-task proxy when batched."""
        if self._hf_tasks is not None and isinstance(value, _nn.Module):
            view = _PerTaskView if self._hf_compiling else _BatchedView
            return view(value, self)
        return value

    def named_children(self) -> Iterator[Tuple[str, Any]]:
        return ((n, self._wrap(m)) for n, m in self._hf_tree.root.named_children())

    def children(self) -> Iterator[Any]:
        return (m for _, m in self.named_children())

    def named_modules(
        self, memo: Optional[set] = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[Tuple[str, Any]]:
        """``(name, module)`` for the patched module itself and each of its submodules (the
        patch's copies, or their per-task proxies with ``num_tasks``).

        ``memo`` is honoured as ``nn.Module.named_modules`` honours it, so a module holding
        the patched module as a child (``self.q_net = fmodel``) lists it once.
        """
        if memo is None:
            memo = set()
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        # The root copy's children, not the root copy itself: the patched module stands for it.
        for name, child in self._hf_tree.root._modules.items():
            if child is not None:
                named = child.named_modules(
                    memo, prefix + ("." if prefix else "") + name, remove_duplicate
                )
                yield from ((n, self._wrap(m)) for n, m in named)

    def modules(self) -> Iterator[Any]:
        return (m for _, m in self.named_modules())

    def apply(self, fn: Callable[[Any], None]) -> "_MonkeyPatchBase":
        """``fn`` on every submodule (the patch's copies), then on the patched module itself,
        as ``nn.Module.apply`` does; what ``fn`` changes is the patch's, never the model's.

        Example:
            >>> fmodel = monkeypatch(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
            >>> _ = fmodel.apply(lambda m: m.eval() if isinstance(m, nn.Dropout) else None)
            >>> fmodel[1].training
            False
        """
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def train(self, mode: bool = True) -> "_MonkeyPatchBase":
        """Set the training flags of the patch's copy of the module (the module's own
        ``train()`` override runs); the original module's flags are untouched."""
        self._hf_tree.root.train(mode)
        return self

    def eval(self) -> "_MonkeyPatchBase":
        self._hf_tree.root.eval()
        return self

    @property
    def training(self) -> bool:
        return self._hf_tree.root.training

    @training.setter
    def training(self, mode: bool) -> None:
        self._hf_tree.root.training = mode

    # -- parameters, buffers, state ------------------------------------------------------------
    def parameters(
        self, recurse: bool = True, time: Optional[int] = None
    ) -> Iterator[_torch.Tensor]:
        """The fast weights, in ``module.parameters()`` order (tied weights once).

        Args:
            recurse: kept for ``nn.Module`` compatibility; as in higher, the fast weights of
                all submodules are yielded either way.
            time: which step's weights: ``None`` (or -1) for the latest, ``k`` for the weights
                after ``k`` updates (0: the initial ones).

        Raises:
            ValueError: ``time`` names a past step while not tracking higher-order gradients,
                or an unknown step; or the patched module has no fast weights yet.
        """
        return iter(self._params_at(time))

    def named_parameters(
        self,
        prefix: str = "",
        recurse: bool = True,
        remove_duplicate: bool = True,
        time: Optional[int] = None,
    ) -> Iterator[Tuple[str, _torch.Tensor]]:
        """``(name, fast weight)`` pairs (see ``parameters``); with ``remove_duplicate=False``
        a tied weight is yielded under each of its names."""
        dot = "." if prefix else ""
        params = self._params_at(time)
        if not remove_duplicate:
            index = self._hf_tree.param_index
            return iter([(prefix + dot + n, params[i]) for n, i in index.items()])
        return zip([prefix + dot + n for n in self._hf_tree.param_names], params)

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[Tuple[str, _torch.Tensor]]:
        """``(name, buffer)`` pairs of the patch's own buffers (copies of the module's)."""
        tree = self._hf_tree
        if tree.buffers_as_attributes:
            dot = "." if prefix else ""
            return zip([prefix + dot + n for n in tree.buffer_names], tree.read_buffers())
        return tree.root.named_buffers(prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[_torch.Tensor]:
        return (b for _, b in self.named_buffers(recurse=recurse))

    def state_dict(
        self,
        *args: Any,
        destination: Optional[Dict[str, Any]] = None,
        prefix: str = "",
        keep_vars: bool = False,
        task: Optional[int] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        """The module's ``state_dict`` with the fast weights and the patch's buffers: it loads
        into the original module's class (to save an adapted model).

        Args:
            destination, prefix, keep_vars: as in ``nn.Module.state_dict`` (a module holding
                the patched module as a child passes all three).
            task: with ``num_tasks``, which task's weights to export (required then).

        Raises:
            ValueError: ``task`` is missing (or out of range) for a batched patched module, or
                given for one that is not batched.
            TypeError: ``task`` is not an int.
        """
        if args or kwargs:
            raise TypeError(
                "state_dict() of a patched module takes only destination=, prefix=, keep_vars= "
                "and task="
            )
        check_task(task, self.num_tasks, "patched module")
        tree = self._hf_tree
        # state_dict() sets a `_metadata` attribute on the dict it makes, which torch 2.15's
        # Dynamo cannot trace; into a dict it is given, it sets none (and nothing reads the
        # metadata of a state dict made inside a compiled meta-step).
        state = tree.root.state_dict(destination=_new_state_dict(), prefix=prefix, keep_vars=True)
        if tree.buffers_as_attributes:  # in the order of the module's own state_dict
            state.update(zip([prefix + n for n in tree.buffer_names], tree.read_buffers()))
            order = self._hf_module.state_dict(
                destination=_new_state_dict(), prefix=prefix, keep_vars=True
            )
            state = type(state)((k, state[k]) for k in order if k in state)
        for key, tensor in state.items():
            if isinstance(tensor, _torch.Tensor):
                # Extra state (get_extra_state) is the module's own, never stacked per task.
                stacked = task is not None and not key.endswith("_extra_state")
                tensor = tensor[task] if stacked else tensor
                state[key] = tensor if keep_vars else tensor.detach()
        if destination is None:
            return state
        destination.update(state)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.update(getattr(state, "_metadata", {}))
        return destination

    def get_parameter(self, target: str) -> _torch.Tensor:
        """The current fast weight called ``target`` (any of a tied weight's names)."""
        if target not in self._hf_index:
            raise AttributeError(f"{type(self._hf_module).__name__} has no parameter {target!r}")
        return self._params_at(None)[self._hf_index[target]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` of the fast weights that are leaves (others never get one)."""
        for p in self.parameters():
            if p.is_leaf and p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # -- tasks ---------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> Optional[int]:
        """The number of tasks whose fast weights are stacked (``None``: not batched)."""
        return None if self._hf_tasks is None else self._hf_tasks.size

    def _stack_shape(self, shape: _torch.Size) -> _torch.Size:
        return shape if self._hf_tasks is None else _torch.Size((self._hf_tasks.size, *shape))

    def _stack(self, tensor: _torch.Tensor) -> _torch.Tensor:
        """``tensor`` repeated once per task (a real copy), or a copy of it when not batched."""
        return tensor.clone() if self._hf_tasks is None else self._hf_tasks.stack(tensor)

    # -- fast weights --------------------------------------------------------------------------
    @property
    def fast_params(self) -> Optional[List[_torch.Tensor]]:
        """The latest fast weights, in ``module.parameters()`` order (``None`` before any)."""
        return None if self._fast_params is None else self._fast_params[-1]

    @fast_params.setter
    def fast_params(self, value: _Params) -> None:
        self._record(self._as_param_list(value))

    def _record(self, params: List[_torch.Tensor]) -> None:
        """Make checked ``params`` current: into the history and the copies' slots."""
        if self._hf_compiling and not self._track_higher_grads:
            # The optimizer made new leaves (detach().requires_grad_()), which Dynamo refuses
            # to return anything computed from: the same values in a form it can return.
            params = [_compile.new_leaf(p, p.requires_grad) for p in params]
        if self._fast_params is None or not self._track_higher_grads:
            self.__dict__["_fast_params"] = [params]
        else:
            self._fast_params.append(params)
        self._hf_tree.write_params(params)

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
        self.__dict__["_track_higher_grads"] = check_bool("track_higher_grads", value)
        if self._hf_reroute is not None:
            self._hf_reroute.tracked = value

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
        names = self._hf_tree.param_names
        if isinstance(params, Mapping):
            unknown = [k for k in params if k not in self._hf_index]
            missing = [k for k in names if k not in params]
            if unknown or missing:
                raise UnknownKeyError(
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
        for name, p, shape, (dtype, device) in zip(names, params, self._hf_shapes, self._hf_kinds):
            if not isinstance(p, _torch.Tensor):
                raise TypeError(f"parameter {name!r} must be a tensor, got {type(p).__name__}")
            if p.shape != shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(p.shape)}, expected {tuple(shape)}"
                )
            # Mixed dtypes or devices would be promoted or, under vmap, silently miscomputed.
            if p.dtype != dtype:
                raise TypeError(
                    f"parameter {name!r} has dtype {p.dtype}, expected {dtype}, its dtype when "
                    "the module was patched (to change dtypes, convert the module, e.g. "
                    "model.double(), then patch it again)"
                )
            device = self._hf_device or device
            if not same_device(p.device, device):
                raise ValueError(f"parameter {name!r} is on {p.device}, expected {device}")
        return params

    def __repr__(self) -> str:
        steps = (
            "no fast weights"
            if self._fast_params is None
            else (f"{len(self._fast_params)} fast weight step(s) kept")
        )
        return f"MonkeyPatched({self._hf_module!r}) [{steps}]"

    def __dir__(self) -> List[str]:
        # (object.__dir__ would read the class from __class__, i.e. the module's class.)
        names = set(self.__dict__) | set(dir(type(self))) | set(dir(self._hf_tree.root))
        return sorted(names | set(_HIGHER_ATTRIBUTES))


def _refuse_new_module(name: str) -> None:
    raise TypeError(
        f"cannot assign a module to {name!r} of a patched module: its parameters would not be "
        "fast weights (the optimizer would never update them). Give the model that module "
        "before patching it"
    )


def _refuse(name: str, module: _nn.Module) -> None:
    # Only nn.Module's own methods: a module's attribute of the same name (self.type = "...")
    # is the module's to read.
    if name in _REFUSED and name not in module.__dict__:
        raise AttributeError(
            f"a patched module has no {name}(): it would convert or overwrite the fast weights "
            "in place, cutting them off the graph. Move or convert the module before patching "
            "it (monkeypatch(model.to(device)), or pass device=), replace fast weights with "
            "update_params(), and save adapted weights with state_dict()"
        )


def _batched_attr(patch: _MonkeyPatchBase, module: _nn.Module, name: str) -> Any:
    """Attribute ``name`` of ``module`` (one of a batched patch's copies) as the user sees it:
    methods and properties computed from the weights run once per task, and every submodule
    they hand out is a per-task view."""
    own = module.__dict__.get(name, _NOT_OWN)
    if isinstance(own, _Mixed):
        raise own.error()
    if isinstance(own, _types.MethodType) and isinstance(own.__self__, _nn.Module):
        # A method kept as an attribute (self.embed = self._embed): it computes from the
        # weights like a method of the class, so it runs once per task too.
        return _per_task_method(patch, own.__func__, lambda: getattr(module, name), name)
    class_attr = getattr(type(module), name, None)
    if isinstance(class_attr, (property, _functools.cached_property)):
        return _views_in(patch, patch._per_task(lambda: getattr(module, name), (), {}))
    if not _inspect.isfunction(class_attr) or own is not _NOT_OWN:
        return _views_in(patch, getattr(module, name))
    if class_attr.__module__.startswith("torch."):
        # nn.Module's and the containers' own methods (get_submodule, values, items...):
        # they read structure, not weights; only the submodules they return need views.
        method = getattr(module, name)

        def with_views(*args: Any, **kwargs: Any) -> Any:
            return _views_in(patch, method(*args, **kwargs))

        with_views.__name__ = name
        with_views.__doc__ = class_attr.__doc__
        return with_views
    return _per_task_method(patch, class_attr, lambda: getattr(module, name), name)


_NOT_OWN = object()


def _per_task_method(
    patch: _MonkeyPatchBase, function: Any, bound: Callable[[], Any], name: str
) -> Callable[..., Any]:
    """A method of a batched patch's module copy that runs once per task."""
    if _inspect.isgeneratorfunction(function):
        raise TypeError(
            f"{name} is a generator: it would run after the call that lends each task its "
            "weights; with num_tasks, call a method that returns its results instead"
        )

    def per_task(*args: Any, **kwargs: Any) -> Any:
        return _views_in(patch, patch._per_task(bound(), args, kwargs))

    per_task.__name__ = name
    per_task.__doc__ = function.__doc__
    return per_task


def _views_in(patch: _MonkeyPatchBase, value: Any) -> Any:
    """``value`` with every module in it (directly, or in a list, tuple, dict, dict view or
    iterator) replaced by its per-task view."""
    if isinstance(value, _nn.Module):
        return patch._wrap(value)
    # A container without modules in it is returned itself: the user may change it in
    # place (fmodel.acts.clear()), which every task then sees at its next call.
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        items = [_views_in(patch, v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items)
    if isinstance(value, dict):
        pairs = [(k, _views_in(patch, v)) for k, v in value.items()]
        if all(v is value[k] for k, v in pairs):
            return value
        return type(value)(pairs)
    if isinstance(value, (_abc.ItemsView, _abc.ValuesView, _abc.Iterator)):
        return [_views_in(patch, v) for v in value]
    return value


class _PerTaskView:
    """A submodule of a batched patched module: calls and methods run once per task on that
    task's weights; attributes read the stacked ``[num_tasks, ...]`` tensors.

    This form is the one built inside a compiled meta-step (Dynamo cannot build an object
    whose ``__class__`` is a property); eager code gets ``_BatchedView``.
    """

    def __init__(self, module: _nn.Module, patch: _MonkeyPatchBase) -> None:
        object.__setattr__(self, "_hf_module", module)
        object.__setattr__(self, "_hf_patch", patch)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._hf_patch._per_task(self._hf_module, args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._hf_patch._per_task(self._hf_module.forward, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # (_hf_ names are read before __init__ set them while Dynamo builds a view: without
        # this, each read would recurse into __getattr__.)
        if name.startswith(("__", "_hf_")):
            raise AttributeError(name)
        _refuse(name, self._hf_module)
        return _batched_attr(self._hf_patch, self._hf_module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, _nn.Module):
            _refuse_new_module(name)
        setattr(self._hf_module, name, value)

    def __getitem__(self, key: Any) -> Any:
        return self._hf_patch._wrap(self._hf_module[key])

    def __len__(self) -> int:
        return len(self._hf_module)

    def __iter__(self) -> Iterator[Any]:
        return (self._hf_patch._wrap(item) for item in iter(self._hf_module))

    def named_children(self) -> Iterator[Tuple[str, Any]]:
        return ((n, self._hf_patch._wrap(m)) for n, m in self._hf_module.named_children())

    def children(self) -> Iterator[Any]:
        return (m for _, m in self.named_children())

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[Tuple[str, Any]]:
        return (
            (n, self._hf_patch._wrap(m)) for n, m in self._hf_module.named_modules(*args, **kwargs)
        )

    def modules(self) -> Iterator[Any]:
        return (m for _, m in self.named_modules())

    def train(self, mode: bool = True) -> "_PerTaskView":
        self._hf_module.train(mode)
        return self

    def eval(self) -> "_PerTaskView":
        self._hf_module.eval()
        return self

    def __repr__(self) -> str:
        return f"PerTask({self._hf_module!r})"


class _BatchedView(_PerTaskView):
    """A per-task view (``_PerTaskView``) for which ``isinstance(view, ModuleClass)`` holds
    (it reports its module's class), so loops such as
    ``for m in fmodel.modules(): if isinstance(m, nn.Dropout): m.eval()`` work batched too.
    """

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._hf_module)


class Batching(NamedTuple):
    """How a batched patched module runs its tasks (see ``batching``)."""

    mode: str  # "vmap" or "loop"
    reason: Optional[str]  # why it loops; None when it vmaps


def batching(fmodule: _MonkeyPatchBase) -> Optional[Batching]:
    """How the tasks of a batched patched module run: one ``torch.vmap`` call, or a Python
    loop over tasks (the same results); ``None`` when ``fmodule`` is not batched.

    The loop is chosen at patch time for modules without vmap batching rules (RNNs,
    BatchNorm with ``momentum=None``) and, on a CPU, for convolutions with BatchNorm (where it
    is faster); or at the first call that vmap cannot run. A function, not an attribute of the
    patched module, so that it never hides an attribute of the user's module.

    Example:
        >>> fmodel = monkeypatch(torch.nn.Linear(3, 1), num_tasks=4)
        >>> batching(fmodel)
        Batching(mode='vmap', reason=None)
        >>> batching(monkeypatch(torch.nn.LSTM(3, 2), num_tasks=4)).mode  # doctest: +SKIP
        'loop'
    """
    if not isinstance(fmodule, _MonkeyPatchBase):
        raise TypeError(f"expected a patched module, got {type(fmodule).__name__}")
    tasks = fmodule._hf_tasks
    return None if tasks is None else Batching(tasks.mode, tasks.reason)


def make_functional(
    module: _nn.Module,
    encapsulator: _EncapsulatorType = None,
    num_tasks: Optional[int] = None,
    device: Optional[_torch.device] = None,
    randomness: str = "different",
    batching: str = "auto",
) -> _MonkeyPatchBase:
    """A patched module without fast weights: every call must pass ``params=``.

    Args:
        module: the module to wrap; it is never modified.
        encapsulator: optional ``f(fmodule, module)`` run once on the new patched module, e.g.
            to give it initial fast weights with ``fmodule.update_params``.
        num_tasks, randomness, batching: see ``monkeypatch``.
        device: the device fast weights must be on (default: the module's).

    Returns:
        The patched module, holding copies of ``module``'s buffers.

    Raises:
        ValueError: ``module`` is already a patched module, or holds one as a submodule.
    """
    if isinstance(module, _MonkeyPatchBase):
        raise ValueError(
            "this module is already a patched module; patch the original module instead"
        )
    if not isinstance(module, _nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    try:
        fmodule = _MonkeyPatchBase(module, num_tasks, device, randomness, batching)
    except Exception:
        # (Checked only on failure: patching stays one pass over the tree.)
        inner = next((n for n, m in module.named_modules() if type(m) is _MonkeyPatchBase), None)
        if inner is not None:
            raise ValueError(
                f"submodule {inner!r} of this module is a patched module; patch the module "
                "that holds the original one instead"
            ) from None
        raise
    if encapsulator is not None:
        encapsulator(fmodule, module)
    if fmodule._fast_params is None:
        # Until fast weights are given, the copies hold private copies of the module's
        # weights: a submodule called directly (fmodule.encoder(x)) computes as the module
        # does, and an in-place write in its forward (Embedding's max_norm) stays in the patch.
        fmodule._hf_tree.write_params([p.detach().clone() for p in fmodule._hf_tree.params])
    return fmodule


def buffer_sync(
    module: _nn.Module, fmodule: _MonkeyPatchBase, device: Optional[_torch.device] = None
) -> None:
    """Overwrite ``fmodule``'s buffers with fresh copies of ``module``'s buffers.

    Raises:
        KeyError: ``module`` has a buffer the patched module does not know.
    """
    if not isinstance(fmodule, _MonkeyPatchBase):
        raise TypeError(f"expected a patched module, got {type(fmodule).__name__}")
    tree = fmodule._hf_tree
    buffers = tree.read_buffers()
    index = {name: i for i, name in enumerate(tree.buffer_names)}
    for name, buffer in module.named_buffers():
        if name not in index:
            raise UnknownKeyError(f"buffer {name!r} is not a buffer of the patched module")
        copy = fmodule._stack(buffer.detach())
        buffers[index[name]] = copy if device is None else copy.to(device)
    tree.write_buffers(buffers)


def monkeypatch(
    module: _nn.Module,
    device: Optional[_torch.device] = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
    num_tasks: Optional[int] = None,
    randomness: str = "different",
    batching: str = "auto",
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
            and buffers are stacked ``[num_tasks, *shape]`` and every call runs once per task
            over the leading dim of its positional inputs. ``in_dims=`` on a call says
            otherwise, as in ``torch.vmap``: an int or None (shared by all tasks) per
            positional input, optionally followed by a dict for keyword inputs that hold
            tensors, e.g. ``fmodel(x, mask=m, in_dims=(0, {"mask": None}))``; a keyword tensor
            not named there is refused (whether it is per task would be a guess). Each task's
            initial weights are a copy made inside the graph, so meta-gradients of all tasks
            sum into ``module``'s parameters. The tasks run in one ``torch.vmap`` call, or in
            a Python loop with the same results where vmap cannot run them (RNNs, BatchNorm
            with ``momentum=None``, an op without a batching
            rule met at the first call; with a one-time ``BatchingFallbackWarning``) or is
            slower (convolutions with BatchNorm on a CPU). ``batching(fmodel)`` says which.
        randomness: with ``num_tasks``, how random ops (dropout) draw across tasks, with
            ``torch.vmap``'s meanings: ``"different"`` (the default: each task its own mask,
            as a loop over tasks does), ``"same"`` or ``"error"``.
        batching: with ``num_tasks``, how the tasks run: ``"auto"`` (the default: one
            ``torch.vmap`` call where vmap can run the module and is faster, else a loop, as
            described above), ``"vmap"`` (always vmap; what vmap cannot run raises instead of
            falling back) or ``"loop"`` (a Python loop over tasks). Every mode gives each task
            what a separate patch of it would hold (see docs/batching.md).

    Returns:
        The patched module (a ``_MonkeyPatchBase``); call it like ``module``, optionally with
        ``params=``.

    Raises:
        ValueError: ``module`` is already patched, ``num_tasks`` is not a positive int, or
            ``batching`` is not one of ``"auto"``, ``"vmap"``, ``"loop"`` (or is given without
            ``num_tasks``).
        TypeError: ``copy_initial_weights`` or ``track_higher_grads`` is not a bool.

    Example (batched):
        >>> model = torch.nn.Linear(3, 1)
        >>> fmodel = monkeypatch(model, copy_initial_weights=False, num_tasks=4)
        >>> fmodel(torch.randn(4, 10, 3)).shape  # one batch of 10 inputs per task
        torch.Size([4, 10, 1])
    """

    # A flag, never a truthy value: copy_initial_weights="no" would silently copy.
    check_bool("copy_initial_weights", copy_initial_weights)
    check_bool("track_higher_grads", track_higher_grads)

    def encapsulator(fmodule: _MonkeyPatchBase, module: _nn.Module) -> None:
        originals = fmodule._hf_tree.params
        if copy_initial_weights and fmodule._hf_compiling:
            params = [_compile.new_leaf(fmodule._stack(p), p.requires_grad) for p in originals]
        elif copy_initial_weights:
            params = [fmodule._stack(p.detach()).requires_grad_(p.requires_grad) for p in originals]
        else:
            # A copy on the tape: gradients flow back into p, and an in-place write in a
            # forward (weight clipping) never reaches p or another task's weights.
            params = [fmodule._stack(p) for p in originals]
        if device is not None:
            params = [p.to(device) for p in params]
        fmodule._record(params)  # made from the module's own parameters: nothing to check

    fmodule = make_functional(
        module,
        encapsulator=encapsulator,
        num_tasks=num_tasks,
        device=device,
        randomness=randomness,
        batching=batching,
    )
    fmodule.track_higher_grads = track_higher_grads
    return fmodule


# Keep `higher.patch`'s type names importable for code that annotates with them.
_BufferType = Dict[str, Optional[_torch.Tensor]]


def _new_state_dict() -> Optional[Dict[str, Any]]:
    """Where ``state_dict`` collects: its own dict in eager code, a plain one while compiling
    (dicts keep their order; torch 2.15's Dynamo cannot look for attributes on an OrderedDict)."""
    return {} if _is_compiling() else None
