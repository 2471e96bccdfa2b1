"""Pure, differentiable update rules for the optimizers of ``torch.optim``.

Each rule is a function ``update(param, grad, state, **hyper) -> (new_param, new_state)`` that
advances one parameter tensor by one step. It never writes into its inputs: the returned
parameter and every returned state tensor are fresh results of out-of-place operations, so
autograd can differentiate through many unrolled steps (``create_graph=True``), and the same
function runs unchanged under ``torch.func.vmap`` and ``torch.compile(fullgraph=True)``.

Conventions shared by every rule:

* ``state`` is the per-parameter dict of ``torch.optim`` with the same keys, except that
  ``state["step"]`` is a Python ``int`` (``torch.optim`` keeps a float tensor; the higher
  variants keep an imported one, as higher did, and the others read it once). An empty dict
  means "first step"; missing entries are created the way ``torch.optim`` creates them.
  Scalar state other than ``step`` (ASGD's ``eta`` and ``mu``, NAdam's ``mu_product``) is
  returned as 0-dim tensors on the parameter's device, in the parameter's dtype but at least
  float32, as ``torch.optim`` keeps them in tensors. Tensors rather than Python floats,
  because a float that changes every step would make ``torch.compile`` recompile every step
  and cannot be returned from ``vmap``. Python floats are accepted on input.
* Hyperparameters are keyword arguments named after the param-group keys of ``torch.optim``
  (``UpdateRule.hyperparameters`` lists them). Any float hyperparameter may be a tensor,
  including one that requires grad (a learned learning rate, tensor ``betas``...). The rules
  never branch on the value of a tensor: shortcuts such as "momentum is zero" are taken only
  for Python numbers, and a tensor always goes through the general formula, which gives the
  same values. Flags (``nesterov``, ``amsgrad``...) and ``step`` are Python values and may be
  branched on.
* Scalar factors that depend only on Python numbers (bias corrections, NAdam's momentum
  cache, RAdam's rectification) are computed in Python floats with the same expressions as
  ``torch.optim``, and tensor operations mirror its single-tensor kernels (``addcdiv``,
  ``lerp``...), so trajectories agree with ``torch.optim.X(..., foreach=False)`` to rounding.

Matching ``torch.optim``: the rules follow the single-tensor code paths of torch 2.13. Where
``torch.optim`` detaches something (SGD's first momentum buffer, ASGD's initial ``eta``), the
rule keeps it attached: values are equal, but gradients also flow through those paths. One
difference in values remains: ``torch.optim`` stores ASGD's ``eta``/``mu`` and NAdam's
``mu_product`` in the default dtype (float32 unless changed) and does the arithmetic on them
in Python floats, while the rules store them in the parameter's dtype and compute with
tensors. Trajectories then agree to float32 rounding of those scalars (about 1e-6 relative
with the default float32), and to double rounding under a float64 default dtype.

Multi-tensor variants: SGD, Adam and AdamW also have a ``*_foreach`` variant, registered as
``UpdateRule.foreach``, that advances all the tensors of a parameter group in one call of each
multi-tensor op (``_compat.foreach_*``), as ``torch.optim.X(..., foreach=True)`` does. Each op
is then one autograd node for the whole group instead of one per tensor: fewer, larger
operations. The optimizers run it in eager mode under torch.optim's numerics when every
hyperparameter but ``lr`` is a Python value (``UpdateRule.select_foreach``) and the group takes
it (by default only for untracked steps: torch's multi-tensor ops save their inputs for
backward, see ``DifferentiableOptimizer._multi_tensor``); the single-tensor rule stays the
reference and runs everywhere else: under ``torch.compile``, under higher's numerics, for tensor
``betas``, ``momentum``..., for per-task values of a batched optimizer, and in the other
optimizers. Which ``torch.optim`` path each is checked against, in the tests:

=============================  ====================  ========================================
optimizers                     eager path            compared with
=============================  ====================  ========================================
SGD, Adam, AdamW               ``*_foreach``         ``foreach=True`` (bit for bit) and the
                                                     single-tensor rule (values, meta-grads)
the others                     single-tensor rule    ``foreach=False``
any, compiled or ``higher``    single-tensor rule    ``foreach=False`` (or higher 0.2.1)
=============================  ====================  ========================================

On CPU the two ``torch.optim`` paths run the same per-tensor kernels, so the variants round
exactly as the single-tensor rules do.

Numerics of higher 0.2.1: every optimizer higher shipped (SGD, Adam, Adadelta, Adagrad,
Adamax, ASGD, RMSprop, Rprop) also has a ``*_higher`` variant next to its rule, registered as
``UpdateRule.higher``: the same formula with higher's order of operations, rounding and
``eps`` placement, so that unrolls and meta-gradients match higher bit for bit. The
optimizers run it under ``higher_func.optim.numerics("higher")`` (or
``HIGHER_FUNC_NUMERICS=higher``); the default stays torch.optim's. The variants follow the
same contract, except that ASGD's ``eta``/``mu`` are Python floats, as in higher.

Second-order safety: the derivative of ``sqrt`` at 0 is infinite, and a second moment that is
exactly zero (a coordinate whose gradient has always been 0) would turn meta-gradients into
``0 * inf = nan``. ``_safe_sqrt`` removes that without changing forward values; see its
docstring. ``higher`` 0.2.1 hid the same NaNs with gradient hooks, which ``torch.func`` and
``torch.compile`` cannot trace.

Example:
    >>> import torch
    >>> rule = RULES["adam"]
    >>> param, grad = torch.ones(3), torch.full((3,), 0.5)
    >>> new_param, state = rule.update(param, grad, {}, lr=0.1)
    >>> sorted(state), state["step"]
    (['exp_avg', 'exp_avg_sq', 'step'], 1)
    >>> new_param
    tensor([0.9000, 0.9000, 0.9000])
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import _compat
from ._compat import is_compiling

__all__ = [
    "OPTIMIZERS",
    "RULES",
    "UpdateRule",
    "adadelta",
    "adadelta_higher",
    "adagrad",
    "adagrad_higher",
    "adam",
    "adam_higher",
    "adamax",
    "adamax_higher",
    "adam_foreach",
    "adamw",
    "adamw_foreach",
    "asgd",
    "asgd_higher",
    "nadam",
    "radam",
    "rmsprop",
    "rmsprop_higher",
    "rprop",
    "rprop_higher",
    "sgd",
    "sgd_foreach",
    "sgd_higher",
]

Scalar = Any  # a Python number or a tensor broadcastable against the parameter
State = dict  # one parameter's optimizer state, keyed like torch.optim's


class UpdateRule(NamedTuple):
    """One optimizer's update rule and the param-group keys it reads.

    Attributes:
        update: ``update(param, grad, state, **hyper) -> (new_param, new_state)``; see the
            module docstring for the contract.
        hyperparameters: the param-group keys ``update`` takes as keyword arguments. Options
            that only pick a ``torch.optim`` kernel (``foreach``, ``fused``, ``capturable``,
            ``differentiable``) are not among them.
        higher: the same update with higher 0.2.1's arithmetic (same keyword arguments and
            state keys), run instead of ``update`` under ``numerics("higher")``; ``None`` for
            optimizers higher did not ship.
    """

    update: Callable[..., tuple[Tensor, State]]
    hyperparameters: tuple[str, ...]
    higher: Optional[Callable[..., tuple[Tensor, State]]] = None
    foreach: Optional[Callable[..., tuple[list[Tensor], list[State]]]] = None

    def select(self, numerics: str) -> Callable[..., tuple[Tensor, State]]:
        """The update to run under ``numerics`` (``"torch"`` or ``"higher"``).

        Rules of optimizers that higher 0.2.1 did not ship (AdamW, NAdam, RAdam, custom
        ones) have no higher variant and always run ``update``.
        """
        if numerics == "higher" and self.higher is not None:
            return self.higher
        return self.update

    def select_foreach(
        self, numerics: str, hyper: dict[str, Any]
    ) -> Optional[Callable[..., tuple[list[Tensor], list[State]]]]:
        """The multi-tensor update to run for one parameter group, or ``None`` when ``update``
        (one call per tensor) must run instead.

        The multi-tensor variant runs in eager mode under torch.optim's numerics when every
        hyperparameter but ``lr`` is a Python value; ``update`` stays the reference
        everywhere else: under ``torch.compile`` (Inductor fuses the per-tensor ops anyway),
        under higher's numerics, and for tensor ``betas``, ``momentum``, ``eps``...
        """
        if self.foreach is None or numerics != "torch" or is_compiling():
            return None
        for key, value in hyper.items():
            if key == "lr":
                continue
            if _is_tensor(value) or (
                isinstance(value, tuple) and any(_is_tensor(v) for v in value)
            ):
                return None
        return self.foreach


# ---------------------------------------------------------------------------------------------
# Helpers. Each takes the fast, bit-compatible torch op when a coefficient is a Python number
# and plain tensor arithmetic (equal values, differentiable in the coefficient) otherwise.


def _is_tensor(x: Any) -> bool:
    return isinstance(x, Tensor)


def _is_zero(x: Scalar) -> bool:
    """Whether ``x`` is a Python number equal to 0.

    A tensor is never "zero" here, even when its value is: its value may change between
    calls (a learned hyperparameter), it may differ across a vmapped batch, and reading it
    would be data-dependent control flow. The general formula gives the same values anyway.
    """
    return not _is_tensor(x) and x == 0


# Eager steps use the fused forms (``torch.add(x, y, alpha=a)``, ``addcmul``, ``addcdiv``,
# ``lerp``), which round exactly as torch.optim does. Compiled steps use plain arithmetic: in
# torch 2.13, Inductor compiles ``torch.add(p, g, alpha=-lr)`` applied to a gradient traced with
# ``trace_autograd_ops`` into ``p + g`` (the alpha is lost), so a compiled inner step moved the
# wrong way.


def _fused(coefficient: Scalar) -> bool:
    return not _is_tensor(coefficient) and not is_compiling()


def _axpy(x: Tensor, y: Tensor, alpha: Scalar) -> Tensor:
    """Return ``x + alpha * y``."""
    return torch.add(x, y, alpha=alpha) if _fused(alpha) else x + alpha * y


def _addcmul(x: Tensor, a: Tensor, b: Tensor, value: Scalar) -> Tensor:
    """Return ``x + value * a * b``."""
    return torch.addcmul(x, a, b, value=value) if _fused(value) else x + value * a * b


def _addcdiv(x: Tensor, a: Tensor, b: Tensor, value: Scalar) -> Tensor:
    """Return ``x + value * a / b``."""
    return torch.addcdiv(x, a, b, value=value) if _fused(value) else x + value * a / b


def _lerp(x: Tensor, y: Tensor, weight: Scalar) -> Tensor:
    """Return ``x + weight * (y - x)``."""
    # torch.lerp wants a weight of the input's dtype; a tensor weight takes the arithmetic.
    return torch.lerp(x, y, weight) if _fused(weight) else x + weight * (y - x)


def _ema_of_square(avg: Tensor, grad: Tensor, decay: Scalar) -> Tensor:
    """Return ``decay * avg + (1 - decay) * grad**2``, the running second moment."""
    return _addcmul(avg * decay, grad, grad, 1 - decay)


def _safe_sqrt(x: Tensor) -> Tensor:
    """Square root whose derivative is 0, not infinite, where ``x == 0``.

    Forward values equal ``torch.sqrt(x)`` everywhere (negative inputs still give NaN, as in
    torch.optim). When ``x`` requires grad, zeros are swapped for ones before the root and
    the result is put back to 0 afterwards: ``torch.where`` sends a zero gradient into the
    unused branch, and because that branch is now finite, ``0 * finite`` stays 0 instead of
    the ``0 * inf = nan`` a plain ``sqrt`` produces. Without grad the plain op is cheaper.
    """
    if not x.requires_grad:
        return torch.sqrt(x)
    is_zero = x == 0
    root = torch.sqrt(torch.where(is_zero, torch.ones_like(x), x))
    return torch.where(is_zero, torch.zeros_like(root), root)


def _signed(grad: Tensor, maximize: bool) -> Tensor:
    """The descent direction's gradient: ``-grad`` when maximizing."""
    return -grad if maximize else grad


def _next_step(state: State) -> int:
    """The 1-based index of the step being taken, from ``state["step"]`` (default 0), as a
    Python int, so that the bias corrections are exact Python floats and no tensor value
    steers control flow. A tensor step (torch.optim's, kept by higher's numerics) is read once
    into an int."""
    step = state.get("step", 0)
    if _is_tensor(step):
        step = int(step)
    return step + 1


def _next_step_higher(state: State) -> Scalar:
    """``state["step"] + 1`` as higher 0.2.1 advanced it: a Python int for state it created,
    but torch.optim's float32 tensor for state imported from a ``torch.optim`` optimizer,
    whose bias corrections and decayed learning rates are then float32 tensor arithmetic."""
    return state.get("step", 0) + 1


def _power(beta: Scalar, step: int) -> Scalar:
    """``beta ** step``, in Python floats for a Python ``beta``, as torch.optim computes it.

    For a tensor ``beta`` the exponent is made a tensor too. Under ``torch.compile`` the step
    becomes a symbolic int after the first few calls, and autograd's rule for a tensor
    raised to a symbolic int fails in the backward pass; a float exponent would instead be
    specialised and recompile every step.
    """
    if not _is_tensor(beta):
        return beta**step
    return beta ** torch.tensor(step, dtype=beta.dtype, device=beta.device)


def _coupled_weight_decay(grad: Tensor, param: Tensor, weight_decay: Scalar) -> Tensor:
    """L2 penalty folded into the gradient: ``grad + weight_decay * param``."""
    if _is_zero(weight_decay):
        return grad
    return _axpy(grad, param, weight_decay)


def _apply_weight_decay(
    param: Tensor, grad: Tensor, lr: Scalar, weight_decay: Scalar, decoupled: bool
) -> tuple[Tensor, Tensor]:
    """Weight decay as Adam, NAdam and RAdam apply it.

    Returns:
        ``(param, grad)``: with ``decoupled`` the parameter shrinks by ``1 - lr *
        weight_decay`` and the gradient is untouched (AdamW); otherwise the L2 term is added
        to the gradient.
    """
    if _is_zero(weight_decay):
        return param, grad
    if decoupled:
        return param * (1 - lr * weight_decay), grad
    return param, _axpy(grad, param, weight_decay)


def _zeros_like(state: State, key: str, param: Tensor) -> Tensor:
    """``state[key]``, or zeros shaped like ``param`` when absent (lazy initialisation)."""
    value = state.get(key)
    return torch.zeros_like(param) if value is None else value


def _scalar_tensor(value: Scalar, param: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor next to ``param``; tensors pass through (keeping grad).

    The dtype is the parameter's, but at least float32: these scalars compound over steps,
    and torch.optim keeps them in float32 (its default dtype) even for half-precision
    parameters.
    """
    if _is_tensor(value):
        return value
    dtype = torch.promote_types(param.dtype, torch.float32)
    return torch.tensor(value, dtype=dtype, device=param.device)


def _filled_like(param: Tensor, value: Scalar) -> Tensor:
    """A tensor shaped like ``param`` holding ``value``, which may be a tensor with grad."""
    if _is_tensor(value):
        return torch.zeros_like(param) + value
    return torch.full_like(param, value)


# ---------------------------------------------------------------------------------------------
# The rules. Each one's keyword-only parameters are its hyperparameters (see _rule).


def sgd(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-3,
    momentum: Scalar = 0,
    dampening: Scalar = 0,
    weight_decay: Scalar = 0,
    nesterov: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    With ``g = ±grad + weight_decay * param``::

        b_1 = g,   b_t = momentum * b_{t-1} + (1 - dampening) * g     (when momentum != 0)
        d   = g + momentum * b_t  if nesterov  else  b_t
        param <- param - lr * d

    Args:
        param, grad, state: see the module docstring. State key: ``momentum_buffer`` (only
            when ``momentum`` is not the Python number 0).
        lr, momentum, dampening, weight_decay: as in ``torch.optim.SGD``.
        nesterov: use Nesterov momentum (torch.optim requires ``momentum > 0`` and
            ``dampening == 0`` for it; that check belongs to the optimizer's constructor).
        maximize: ascend instead of descend.

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.SGD`` step for step; torch.optim detaches the first momentum
    buffer, this rule does not, so meta-gradients see the first step's gradient there too.
    Differs from higher: ``DifferentiableSGD`` ignores ``maximize``.
    """
    grad = _coupled_weight_decay(_signed(grad, maximize), param, weight_decay)
    new_state = dict(state)
    if not _is_zero(momentum):
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = grad
        else:
            buf = _axpy(buf * momentum, grad, 1 - dampening)
        new_state["momentum_buffer"] = buf
        grad = _axpy(grad, buf, momentum) if nesterov else buf
    return _axpy(param, grad, -lr), new_state


def sgd_higher(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-3,
    momentum: Scalar = 0,
    dampening: Scalar = 0,
    weight_decay: Scalar = 0,
    nesterov: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """:func:`sgd` with higher 0.2.1's rounding: ``param + (-lr) * d``, rounded twice.

    ``torch.optim`` (and :func:`sgd`) round ``param - lr * d`` once (``torch.add`` with
    ``alpha``). Both are float32 unrolls of the same formula, but the one-ulp difference
    can flip a ReLU or max-pool near-tie and change meta-gradients, so old results are only
    reproduced with this rounding. Same arguments and state as :func:`sgd`.
    """
    grad = _signed(grad, maximize)
    if not _is_zero(weight_decay):
        grad = grad + weight_decay * param
    new_state = dict(state)
    if not _is_zero(momentum):
        buf = state.get("momentum_buffer")
        buf = grad if buf is None else buf * momentum + (1 - dampening) * grad
        new_state["momentum_buffer"] = buf
        grad = grad + momentum * buf if nesterov else buf
    return param + (-lr) * grad, new_state


def _adam_moments(
    param: Tensor,
    grad: Tensor,
    state: State,
    lr: Scalar,
    betas: tuple[Scalar, Scalar],
    weight_decay: Scalar,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> tuple[Tensor, int, State]:
    """The part Adam and RAdam share: weight decay, then both running moments.

    Returns:
        ``(param, step, new_state)``: the (decayed, if decoupled) parameter, the 1-based step
        and the state with ``step``, ``exp_avg`` and ``exp_avg_sq`` updated.
    """
    beta1, beta2 = betas
    step = _next_step(state)
    grad = _signed(grad, maximize)
    param, grad = _apply_weight_decay(param, grad, lr, weight_decay, decoupled_weight_decay)
    exp_avg = _lerp(_zeros_like(state, "exp_avg", param), grad, 1 - beta1)
    exp_avg_sq = _ema_of_square(_zeros_like(state, "exp_avg_sq", param), grad, beta2)
    return param, step, {**state, "step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def adam(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> tuple[Tensor, State]:
    """Adam (and AMSGrad; AdamW with ``decoupled_weight_decay=True``).

    With ``g = ±grad`` (plus ``weight_decay * param`` unless decoupled)::

        m_t = beta1 * m_{t-1} + (1 - beta1) * g
        v_t = beta2 * v_{t-1} + (1 - beta2) * g**2
        vmax_t = max(vmax_{t-1}, v_t)                                  (amsgrad)
        param <- param * (1 - lr * weight_decay)                       (decoupled)
        param <- param - lr / (1 - beta1**t) * m_t / (sqrt(v_t / (1 - beta2**t)) + eps)

    with ``vmax_t`` in place of ``v_t`` in the last line under amsgrad.

    Args:
        param, grad, state: see the module docstring. State keys: ``step``, ``exp_avg``,
            ``exp_avg_sq`` and, with ``amsgrad``, ``max_exp_avg_sq``.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as in
            ``torch.optim.Adam``. ``betas`` may be a pair of tensors.

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.Adam`` (its non-capturable single-tensor path): bias corrections
    are Python floats when the betas are, and the final update is the same ``addcdiv``.
    Differs from higher: ``DifferentiableAdam`` adds ``eps`` to ``sqrt(v_t)`` before the bias
    correction, which equals torch.optim with ``eps / sqrt(1 - beta2**t)`` (a larger ``eps``
    in early steps); it ignores ``maximize`` and ``decoupled_weight_decay``, and masks NaN
    gradients with hooks.
    """
    beta1, beta2 = betas
    param, step, new_state = _adam_moments(
        param, grad, state, lr, betas, weight_decay, decoupled_weight_decay, maximize
    )
    exp_avg, exp_avg_sq = new_state["exp_avg"], new_state["exp_avg_sq"]
    second_moment = exp_avg_sq
    if amsgrad:
        second_moment = torch.maximum(_zeros_like(state, "max_exp_avg_sq", param), exp_avg_sq)
        new_state["max_exp_avg_sq"] = second_moment

    bias_correction1 = 1 - _power(beta1, step)
    bias_correction2 = 1 - _power(beta2, step)
    step_size = lr / bias_correction1
    # Same expression as torch.optim for Python betas; for tensor betas, sqrt is safe since
    # 1 - beta2**t > 0 whenever beta2 < 1.
    bias_correction2_sqrt = bias_correction2**0.5
    denom = _safe_sqrt(second_moment) / bias_correction2_sqrt + eps
    return _addcdiv(param, exp_avg, denom, -step_size), new_state


def adam_higher(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> tuple[Tensor, State]:
    """:func:`adam` with higher 0.2.1's arithmetic: ``eps`` before the bias correction.

    ::

        param <- param - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m_t / (sqrt(v_t) + eps)

    This is torch.optim's Adam with ``eps * sqrt(1 - beta2**t)`` in place of ``eps``, which
    makes the update far less scale-invariant: with small losses ``eps`` dominates
    ``sqrt(v_t)`` and meta-gradients differ from :func:`adam`'s by orders of magnitude more
    than rounding. Operations are in higher's order (``m * beta1 + (1 - beta1) * g``,
    ``(1 - beta2) * g * g``...), so results match it bit for bit. Same arguments and state
    as :func:`adam`; ``maximize`` and ``decoupled_weight_decay``, which higher ignored, are
    honoured. With a tensor ``beta2``, ``sqrt(1 - beta2**t)`` stays on the tape (higher
    turned it into a Python float with ``math.sqrt``).
    """
    beta1, beta2 = betas
    step = _next_step_higher(state)
    grad = _signed(grad, maximize)
    if decoupled_weight_decay:
        param, grad = _apply_weight_decay(param, grad, lr, weight_decay, True)
    elif not _is_zero(weight_decay):
        grad = grad + weight_decay * param
    exp_avg = _zeros_like(state, "exp_avg", param) * beta1 + (1 - beta1) * grad
    exp_avg_sq = _zeros_like(state, "exp_avg_sq", param) * beta2 + (1 - beta2) * grad * grad
    new_state = {**state, "step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    second_moment = exp_avg_sq
    if amsgrad:
        second_moment = torch.max(_zeros_like(state, "max_exp_avg_sq", param), exp_avg_sq)
        new_state["max_exp_avg_sq"] = second_moment
    denom = _safe_sqrt(second_moment) + eps
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if _is_tensor(bias_correction2):
        step_size = _higher_adam_step_size(lr, bias_correction1, bias_correction2)
    else:
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
    return param + (-step_size) * (exp_avg / denom), new_state


def _higher_adam_step_size(
    lr: Scalar, bias_correction1: Scalar, bias_correction2: Tensor
) -> Tensor:
    """``lr * math.sqrt(bias_correction2) / bias_correction1`` as higher computed it for a
    tensor ``beta2``, with the root kept on the tape.

    higher's ``math.sqrt`` turned the tensor into a Python float, i.e. a double, which later
    arithmetic treats as a Python scalar: double products with Python numbers, rounded to the
    tensor's dtype when it meets a tensor. A float64 root reproduces those roundings.
    """
    root = torch.sqrt(bias_correction2.double())
    if _is_tensor(lr):
        return lr * root.to(lr.dtype) / bias_correction1
    numerator = lr * root  # a Python product: in double
    if _is_tensor(bias_correction1):
        # Python float / tensor is tensor.reciprocal() * float, the float rounded to float32.
        return bias_correction1.reciprocal() * numerator.to(bias_correction1.dtype)
    return numerator / bias_correction1


def adamw(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = True,
) -> tuple[Tensor, State]:
    """AdamW: :func:`adam` with decoupled weight decay, ``param *= 1 - lr * weight_decay``.

    ``torch.optim.AdamW`` is ``Adam(decoupled_weight_decay=True)`` and keeps that key in its
    param groups, so it is accepted here; it must be True.

    Args:
        param, grad, state, lr, betas, eps, weight_decay, amsgrad, maximize: as in
            :func:`adam` (the default ``weight_decay`` is AdamW's, 1e-2).
        decoupled_weight_decay: must be True.

    Returns:
        ``(new_param, new_state)``, with :func:`adam`'s state keys.

    Raises:
        ValueError: if ``decoupled_weight_decay`` is not True.

    Differs from higher: higher 0.2.1 has no differentiable AdamW.
    """
    _check_decoupled(decoupled_weight_decay)
    return adam(
        param,
        grad,
        state,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
    )


def _check_decoupled(decoupled_weight_decay: bool) -> None:
    if decoupled_weight_decay is not True:
        raise ValueError(
            "AdamW always decouples weight decay (decoupled_weight_decay=True); got "
            f"decoupled_weight_decay={decoupled_weight_decay!r}. Use Adam for coupled decay."
        )


def adadelta(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1.0,
    rho: Scalar = 0.9,
    eps: Scalar = 1e-6,
    weight_decay: Scalar = 0,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """Adadelta.

    With ``g = ±grad + weight_decay * param``::

        v_t     = rho * v_{t-1} + (1 - rho) * g**2                     (square_avg)
        delta   = sqrt(u_{t-1} + eps) / sqrt(v_t + eps) * g
        u_t     = rho * u_{t-1} + (1 - rho) * delta**2                 (acc_delta)
        param  <- param - lr * delta

    Args:
        param, grad, state: see the module docstring. State keys: ``step``, ``square_avg``,
            ``acc_delta``.
        lr, rho, eps, weight_decay, maximize: as in ``torch.optim.Adadelta``.

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.Adadelta``. Differs from higher: ``DifferentiableAdadelta``
    ignores ``maximize``.
    """
    step = _next_step(state)
    grad = _coupled_weight_decay(_signed(grad, maximize), param, weight_decay)
    square_avg = _ema_of_square(_zeros_like(state, "square_avg", param), grad, rho)
    acc_delta = _zeros_like(state, "acc_delta", param)
    # eps keeps both roots away from 0 unless eps == 0, which torch.optim allows.
    std = _safe_sqrt(square_avg + eps)
    delta = _safe_sqrt(acc_delta + eps) / std * grad
    acc_delta = _ema_of_square(acc_delta, delta, rho)
    new_state = {**state, "step": step, "square_avg": square_avg, "acc_delta": acc_delta}
    return _axpy(param, delta, -lr), new_state


def adadelta_higher(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1.0,
    rho: Scalar = 0.9,
    eps: Scalar = 1e-6,
    weight_decay: Scalar = 0,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """:func:`adadelta` with higher 0.2.1's order of operations and rounding.

    Same formula, arguments and state as :func:`adadelta`; the running averages are
    ``avg * rho + (1 - rho) * x * x`` and the step ``param + (-lr) * delta``, each rounded
    as higher rounds them.
    """
    step = _next_step_higher(state)
    grad = _signed(grad, maximize)
    if not _is_zero(weight_decay):
        grad = grad + weight_decay * param
    square_avg = _zeros_like(state, "square_avg", param) * rho + (1 - rho) * grad * grad
    acc_delta = _zeros_like(state, "acc_delta", param)
    std = _safe_sqrt(square_avg + eps)
    delta = _safe_sqrt(acc_delta + eps) / std * grad
    acc_delta = acc_delta * rho + (1 - rho) * delta * delta
    new_state = {**state, "step": step, "square_avg": square_avg, "acc_delta": acc_delta}
    return param + (-lr) * delta, new_state


def adagrad(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-2,
    lr_decay: Scalar = 0,
    weight_decay: Scalar = 0,
    initial_accumulator_value: Scalar = 0,
    eps: Scalar = 1e-10,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """Adagrad.

    With ``g = ±grad + weight_decay * param``::

        s_0    = initial_accumulator_value                              (sum)
        s_t    = s_{t-1} + g**2
        param <- param - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s_t) + eps)

    Args:
        param, grad, state: see the module docstring. State keys: ``step``, ``sum``.
        lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize: as in
            ``torch.optim.Adagrad`` (which creates its state in the constructor; here it is
            created on the first call from ``initial_accumulator_value``).

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.Adagrad`` for dense gradients (sparse ones are not supported).
    Differs from higher: ``DifferentiableAdagrad`` ignores ``maximize`` and masks NaN
    gradients with hooks.
    """
    step = _next_step(state)
    grad = _coupled_weight_decay(_signed(grad, maximize), param, weight_decay)
    state_sum = state.get("sum")
    if state_sum is None:
        state_sum = _filled_like(param, initial_accumulator_value)
    state_sum = _addcmul(state_sum, grad, grad, 1)
    clr = lr / (1 + (step - 1) * lr_decay)
    std = _safe_sqrt(state_sum) + eps
    return _addcdiv(param, grad, std, -clr), {**state, "step": step, "sum": state_sum}


def adagrad_higher(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-2,
    lr_decay: Scalar = 0,
    weight_decay: Scalar = 0,
    initial_accumulator_value: Scalar = 0,
    eps: Scalar = 1e-10,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """:func:`adagrad` with higher 0.2.1's rounding.

    higher advanced ``torch.optim.Adagrad``'s own step counter, a float32 tensor, so the
    decayed learning rate ``lr / (1 + (t - 1) * lr_decay)`` is computed in float32 tensor
    arithmetic; the step is ``param + (-clr) * (g / (sqrt(s_t) + eps))``. Same arguments
    and state as :func:`adagrad`.
    """
    step = _next_step_higher(state)
    grad = _signed(grad, maximize)
    if not _is_zero(weight_decay):
        grad = grad + weight_decay * param
    state_sum = state.get("sum")
    if state_sum is None:
        state_sum = _filled_like(param, initial_accumulator_value)
    state_sum = state_sum + 1 * grad * grad
    step_counter = step if _is_tensor(step) else torch.tensor(float(step), dtype=torch.float32)
    clr = lr / (1 + (step_counter - 1) * lr_decay)
    std = _safe_sqrt(state_sum) + eps
    return param + (-clr) * (grad / std), {**state, "step": step, "sum": state_sum}


def adamax(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 2e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """Adamax, Adam with an infinity-norm second moment.

    With ``g = ±grad + weight_decay * param``::

        m_t    = beta1 * m_{t-1} + (1 - beta1) * g                      (exp_avg)
        u_t    = max(beta2 * u_{t-1}, |g| + eps)                        (exp_inf)
        param <- param - lr / (1 - beta1**t) * m_t / u_t

    Args:
        param, grad, state: see the module docstring. State keys: ``step``, ``exp_avg``,
            ``exp_inf``.
        lr, betas, eps, weight_decay, maximize: as in ``torch.optim.Adamax``.

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.Adamax``. Differs from higher: ``DifferentiableAdamax`` ignores
    ``maximize``; its max over a stacked pair sends the whole gradient to one side on ties,
    ``torch.maximum`` splits it.
    """
    beta1, beta2 = betas
    step = _next_step(state)
    grad = _coupled_weight_decay(_signed(grad, maximize), param, weight_decay)
    exp_avg = _lerp(_zeros_like(state, "exp_avg", param), grad, 1 - beta1)
    exp_inf = torch.maximum(_zeros_like(state, "exp_inf", param) * beta2, grad.abs() + eps)
    clr = lr / (1 - _power(beta1, step))
    new_state = {**state, "step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}
    return _addcdiv(param, exp_avg, exp_inf, -clr), new_state


def adamax_higher(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 2e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """:func:`adamax` with higher 0.2.1's rounding and tie-breaking.

    The infinity norm is a max over the stacked pair ``(beta2 * u, |g| + eps)``, which sends
    the whole gradient to one side on ties (``torch.maximum`` splits it). Same formula,
    arguments and state as :func:`adamax`.
    """
    beta1, beta2 = betas
    step = _next_step_higher(state)
    grad = _signed(grad, maximize)
    if not _is_zero(weight_decay):
        grad = grad + weight_decay * param
    exp_avg = _zeros_like(state, "exp_avg", param) * beta1 + (1 - beta1) * grad
    candidates = torch.stack((_zeros_like(state, "exp_inf", param) * beta2, grad.abs() + eps))
    exp_inf = candidates.max(0).values
    clr = lr / (1 - beta1**step)
    new_state = {**state, "step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}
    return param + (-clr) * (exp_avg / exp_inf), new_state


def asgd(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-2,
    lambd: Scalar = 1e-4,
    alpha: Scalar = 0.75,
    t0: Scalar = 1e6,
    weight_decay: Scalar = 0,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """Averaged SGD.

    With ``g = ±grad + weight_decay * param``, ``eta_0 = lr`` and ``mu_0 = 1``::

        param <- param * (1 - lambd * eta_{t-1}) - eta_{t-1} * g
        ax_t   = param  if mu_{t-1} == 1  else  ax_{t-1} + mu_{t-1} * (param - ax_{t-1})
        eta_t  = lr / (1 + lambd * lr * t)**alpha
        mu_t   = 1 / max(1, t - t0)

    Args:
        param, grad, state: see the module docstring. State keys: ``step``, ``eta``, ``mu``
            (0-dim tensors), ``ax``.
        lr, lambd, alpha, t0, weight_decay, maximize: as in ``torch.optim.ASGD``.

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.ASGD``, up to the storage of ``eta`` and ``mu`` (see the module
    docstring). The initial ``eta`` is ``lr`` itself, not a detached copy, so a tensor ``lr``
    receives gradient from every step. ``mu == 1`` picks the branch with ``torch.where``
    rather than Python control flow, so no tensor value is read.
    Differs from higher: ``DifferentiableASGD`` averages the parameter before the gradient
    step is applied (torch.optim averages after it), ignores ``maximize``, and computes
    ``eta`` with ``math.pow``, which turns a tensor ``lr`` into a float in that factor.
    """
    step = _next_step(state)
    grad = _coupled_weight_decay(_signed(grad, maximize), param, weight_decay)
    eta = _scalar_tensor(state.get("eta", lr), param)
    mu = _scalar_tensor(state.get("mu", 1.0), param)
    ax = _zeros_like(state, "ax", param)

    param = _axpy(param * (1 - lambd * eta), grad, -eta)
    # torch.optim copies the parameter when mu == 1; ax + (param - ax) * 1 can differ from
    # it by rounding, so the copy is kept.
    ax = torch.where(mu == 1, param, ax + (param - ax) * mu)

    new_eta = lr / ((1 + lambd * lr * step) ** alpha)
    if _is_tensor(t0):
        new_mu = 1 / torch.clamp(step - t0, min=1)
    else:
        new_mu = 1 / max(1, step - t0)
    new_state = {
        **state,
        "step": step,
        "eta": _scalar_tensor(new_eta, param),
        "mu": _scalar_tensor(new_mu, param),
        "ax": ax,
    }
    return param, new_state


def asgd_higher(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-2,
    lambd: Scalar = 1e-4,
    alpha: Scalar = 0.75,
    t0: Scalar = 1e6,
    weight_decay: Scalar = 0,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """:func:`asgd` as higher 0.2.1 computed it.

    Two differences in values, not only in rounding: the average ``ax`` is taken of the
    decayed parameter *before* the gradient step (torch.optim averages after it), and
    ``eta`` and ``mu`` are Python floats computed in double precision (kept so in the state
    while the hyperparameters are Python numbers). Same arguments and state keys as
    :func:`asgd`. A tensor ``lr`` stays on the tape through ``eta`` (higher's ``math.pow``
    turned that factor into a Python float), so its meta-gradient differs from higher's.
    """
    step = _next_step_higher(state)
    grad = _signed(grad, maximize)
    if not _is_zero(weight_decay):
        grad = grad + weight_decay * param
    eta: Scalar = state.get("eta", lr)
    mu = state.get("mu", 1)
    ax = _zeros_like(state, "ax", param)
    decayed = param * (1 - lambd * eta)
    new_param = decayed + (-eta) * grad
    if _is_tensor(mu):
        ax = torch.where(mu == 1, decayed, ax + (decayed - ax) * mu)
    else:
        ax = decayed if mu == 1 else ax + (decayed - ax) * mu
    base = 1 + lambd * lr * step
    if any(_is_tensor(x) for x in (lr, lambd, alpha)):
        # higher's math.pow made a double of this; a float64 power keeps its rounding and,
        # unlike higher, the gradient into lr, lambd and alpha.
        denominator = torch.as_tensor(base, dtype=torch.float64) ** alpha
        new_eta = lr / (denominator.to(lr.dtype) if _is_tensor(lr) else denominator)
    else:
        new_eta = lr / math.pow(base, alpha)
    if _is_tensor(t0) or _is_tensor(step):
        new_mu = 1 / torch.clamp(step - t0, min=1)
    else:
        new_mu = 1 / max(1, step - t0)
    new_state = {**state, "step": step, "eta": new_eta, "mu": new_mu, "ax": ax}
    return new_param, new_state


def rmsprop(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-2,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    momentum: Scalar = 0,
    centered: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """RMSprop, optionally centered and with momentum.

    With ``g = ±grad + weight_decay * param``::

        v_t    = alpha * v_{t-1} + (1 - alpha) * g**2                   (square_avg)
        a_t    = alpha * a_{t-1} + (1 - alpha) * g                      (grad_avg, centered)
        r      = sqrt(v_t - a_t**2) + eps  if centered  else  sqrt(v_t) + eps
        b_t    = momentum * b_{t-1} + g / r                             (momentum_buffer)
        param <- param - lr * b_t       (momentum > 0)
        param <- param - lr * g / r     (otherwise)

    Args:
        param, grad, state: see the module docstring. State keys: ``step``, ``square_avg``,
            plus ``momentum_buffer`` (unless ``momentum`` is a Python number <= 0) and
            ``grad_avg`` (when ``centered``).
        lr, alpha, eps, weight_decay, momentum, centered, maximize: as in
            ``torch.optim.RMSprop``.

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.RMSprop``. A tensor ``momentum`` always keeps a buffer, whose
    update reduces to the momentum-free one at 0.
    Differs from higher: ``DifferentiableRMSprop`` ignores ``maximize`` and masks NaN
    gradients with hooks on ``square_avg`` only, which higher itself warns do not give
    correct gradients (the centered variance can still be exactly 0); here the safe square
    root keeps every meta-gradient finite.
    """
    step = _next_step(state)
    grad = _coupled_weight_decay(_signed(grad, maximize), param, weight_decay)
    square_avg = _ema_of_square(_zeros_like(state, "square_avg", param), grad, alpha)
    new_state = {**state, "step": step, "square_avg": square_avg}
    if centered:
        grad_avg = _lerp(_zeros_like(state, "grad_avg", param), grad, 1 - alpha)
        new_state["grad_avg"] = grad_avg
        avg = _safe_sqrt(_addcmul(square_avg, grad_avg, grad_avg, -1))
    else:
        avg = _safe_sqrt(square_avg)
    avg = avg + eps

    if _is_tensor(momentum) or momentum > 0:
        buf = _addcdiv(_zeros_like(state, "momentum_buffer", param) * momentum, grad, avg, 1)
        new_state["momentum_buffer"] = buf
        return _axpy(param, buf, -lr), new_state
    return _addcdiv(param, grad, avg, -lr), new_state


def rmsprop_higher(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-2,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    momentum: Scalar = 0,
    centered: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """:func:`rmsprop` with higher 0.2.1's order of operations and rounding.

    Same formula, arguments and state as :func:`rmsprop`.
    """
    step = _next_step_higher(state)
    grad = _signed(grad, maximize)
    if not _is_zero(weight_decay):
        grad = grad + weight_decay * param
    square_avg = _zeros_like(state, "square_avg", param) * alpha + (1 - alpha) * grad * grad
    new_state = {**state, "step": step, "square_avg": square_avg}
    if centered:
        grad_avg = _zeros_like(state, "grad_avg", param) * alpha + (1 - alpha) * grad
        new_state["grad_avg"] = grad_avg
        avg = _safe_sqrt(square_avg + -1 * grad_avg * grad_avg) + eps
    else:
        avg = _safe_sqrt(square_avg) + eps
    if _is_tensor(momentum) or momentum > 0:
        buf = _zeros_like(state, "momentum_buffer", param) * momentum + 1.0 * (grad / avg)
        new_state["momentum_buffer"] = buf
        return param + (-lr) * buf, new_state
    return param + (-lr) * (grad / avg), new_state


def rprop(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-2,
    etas: tuple[Scalar, Scalar] = (0.5, 1.2),
    step_sizes: tuple[Scalar, Scalar] = (1e-6, 50),
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """Resilient backpropagation: sign-based steps with per-coordinate step sizes.

    With ``g = ±grad``, ``s_0 = lr`` and ``p_0 = 0``::

        f      = etaplus if g * p_{t-1} > 0,  etaminus if < 0,  1 if == 0
        s_t    = clamp(s_{t-1} * f, step_size_min, step_size_max)      (step_size)
        g'     = 0 where g * p_{t-1} < 0, else g                       (prev = p_t = g')
        param <- param - sign(g') * s_t

    Args:
        param, grad, state: see the module docstring. State keys: ``step``, ``prev``,
            ``step_size``.
        lr: the initial step size; read only when the state is created.
        etas: ``(etaminus, etaplus)``, the multiplicative decrease and increase factors.
        step_sizes: ``(step_size_min, step_size_max)``.
        maximize: ascend instead of descend.

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.Rprop``. Gradients through the update reach ``param`` directly,
    and ``lr``, ``etas`` and ``step_sizes`` through the step sizes; those through ``sign``
    are zero, as for any sign-based method.
    Differs from higher: ``DifferentiableRprop`` ignores ``maximize`` and finds the
    sign-flipped coordinates by comparing floats to ``etaminus``; here they come from the
    sign of ``g * p_{t-1}`` directly.
    """
    etaminus, etaplus = etas
    step_size_min, step_size_max = step_sizes
    step = _next_step(state)
    grad = _signed(grad, maximize)
    prev = _zeros_like(state, "prev", param)
    step_size = state.get("step_size")
    if step_size is None:
        step_size = _filled_like(param, lr)

    agreement = grad * prev
    flipped = agreement < 0
    # Built on a tensor of the parameter's dtype: torch.where over two Python numbers would
    # produce the default dtype and round the etas to float32 for float64 parameters.
    factor = torch.where(flipped, etaminus, torch.ones_like(grad))
    factor = torch.where(agreement > 0, etaplus, factor)
    step_size = _clamp(step_size * factor, step_size_min, step_size_max)
    # A coordinate whose gradient changed sign does not move this step, and its zeroed
    # gradient becomes `prev`, so the next step treats it as neither agreeing nor flipping.
    grad = torch.where(flipped, torch.zeros_like(grad), grad)
    new_param = param - grad.sign() * step_size
    return new_param, {**state, "step": step, "prev": grad, "step_size": step_size}


def rprop_higher(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-2,
    etas: tuple[Scalar, Scalar] = (0.5, 1.2),
    step_sizes: tuple[Scalar, Scalar] = (1e-6, 50),
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """:func:`rprop` as higher 0.2.1 computed it.

    The factor is built from ``sign(g * p_{t-1})`` by replacing, in turn, positives with
    ``etaplus``, negatives with ``etaminus`` and zeros with 1, and a coordinate does not move
    where the factor equals ``etaminus`` (the same as "the sign flipped" unless ``etaminus``
    is 1 or ``etaplus``). Same arguments and state as :func:`rprop`.
    """
    etaminus, etaplus = etas
    step_size_min, step_size_max = step_sizes
    step = _next_step_higher(state)
    grad = _signed(grad, maximize)
    prev = _zeros_like(state, "prev", param)
    step_size = state.get("step_size")
    if step_size is None:
        step_size = _filled_like(param, lr)
    factor = (grad * prev).sign()
    factor = torch.where(factor > 0, etaplus, factor)
    factor = torch.where(factor < 0, etaminus, factor)
    factor = torch.where(factor == 0, torch.ones_like(factor), factor)
    step_size = _clamp(step_size * factor, step_size_min, step_size_max)
    grad = torch.where(factor == etaminus, torch.zeros_like(grad), grad)
    new_param = param + -1 * grad.sign() * step_size
    return new_param, {**state, "step": step, "prev": grad, "step_size": step_size}


def _clamp(x: Tensor, low: Scalar, high: Scalar) -> Tensor:
    """``torch.clamp`` that also takes tensor bounds mixed with Python ones."""
    if not _is_tensor(low) and not _is_tensor(high):
        return torch.clamp(x, low, high)
    low = low if _is_tensor(low) else torch.tensor(low, dtype=x.dtype, device=x.device)
    high = high if _is_tensor(high) else torch.tensor(high, dtype=x.dtype, device=x.device)
    return torch.minimum(torch.maximum(x, low), high)


def nadam(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 2e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    momentum_decay: Scalar = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """NAdam, Adam with Nesterov momentum and a momentum warm-up schedule.

    With ``g`` and weight decay as in :func:`adam`, and
    ``mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay))``::

        P_t    = P_{t-1} * mu_t,  P_0 = 1                               (mu_product)
        m_t    = beta1 * m_{t-1} + (1 - beta1) * g
        v_t    = beta2 * v_{t-1} + (1 - beta2) * g**2
        d      = sqrt(v_t / (1 - beta2**t)) + eps
        param <- param - lr * (1 - mu_t) / (1 - P_t) * g / d
                       - lr * mu_{t+1} / (1 - P_t * mu_{t+1}) * m_t / d

    Args:
        param, grad, state: see the module docstring. State keys: ``step``, ``mu_product``
            (a 0-dim tensor), ``exp_avg``, ``exp_avg_sq``.
        lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize: as in
            ``torch.optim.NAdam``.

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.NAdam``, up to the storage of ``mu_product`` (see the module
    docstring). Differs from higher: higher 0.2.1 has no differentiable NAdam.
    """
    beta1, beta2 = betas
    step = _next_step(state)
    grad = _signed(grad, maximize)
    param, grad = _apply_weight_decay(param, grad, lr, weight_decay, decoupled_weight_decay)

    bias_correction2 = 1 - _power(beta2, step)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product = _scalar_tensor(state.get("mu_product", 1.0), param) * mu
    mu_product_next = mu_product * mu_next

    exp_avg = _lerp(_zeros_like(state, "exp_avg", param), grad, 1 - beta1)
    exp_avg_sq = _ema_of_square(_zeros_like(state, "exp_avg_sq", param), grad, beta2)
    denom = _safe_sqrt(exp_avg_sq / bias_correction2) + eps
    param = _addcdiv(param, grad, denom, -lr * (1.0 - mu) / (1.0 - mu_product))
    param = _addcdiv(param, exp_avg, denom, (-lr * mu_next) / (1.0 - mu_product_next))
    new_state = {
        **state,
        "step": step,
        "mu_product": mu_product,
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
    }
    return param, new_state


def radam(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """RAdam, Adam whose adaptive step is phased in by a variance rectification.

    With ``g``, ``m_t``, ``v_t`` and weight decay as in :func:`adam`,
    ``rho_inf = 2 / (1 - beta2) - 1`` and
    ``rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)``::

        m_hat  = m_t / (1 - beta1**t)
        r_t    = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
        param <- param - lr * m_hat * sqrt(1 - beta2**t) / (sqrt(v_t) + eps) * r_t   (rho_t > 5)
        param <- param - lr * m_hat                                                  (otherwise)

    Args:
        param, grad, state: see the module docstring. State keys: ``step``, ``exp_avg``,
            ``exp_avg_sq``.
        lr, betas, eps, weight_decay, decoupled_weight_decay, maximize: as in
            ``torch.optim.RAdam``.

    Returns:
        ``(new_param, new_state)``.

    Matches ``torch.optim.RAdam``. With a Python ``beta2`` the ``rho_t > 5`` test is a
    Python branch on Python floats, as in torch.optim; with a tensor ``beta2`` both branches
    are computed and ``torch.where`` picks one, with the rectification's inputs replaced by
    harmless values where it is unused so that its square root cannot leak NaN gradients.
    Differs from higher: higher 0.2.1 has no differentiable RAdam.
    """
    beta1, beta2 = betas
    param, step, new_state = _adam_moments(
        param, grad, state, lr, betas, weight_decay, decoupled_weight_decay, maximize
    )
    exp_avg, exp_avg_sq = new_state["exp_avg"], new_state["exp_avg_sq"]

    bias_correction1 = 1 - _power(beta1, step)
    bias_correction2 = 1 - _power(beta2, step)
    bias_corrected_exp_avg = exp_avg / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * _power(beta2, step) / bias_correction2

    def adaptive_lr() -> Tensor:
        return (bias_correction2**0.5) / (_safe_sqrt(exp_avg_sq) + eps)

    if not _is_tensor(rho_t):
        if rho_t > 5.0:
            rect = _rectification(rho_t, rho_inf)
            update = bias_corrected_exp_avg * lr * adaptive_lr() * rect
        else:
            update = bias_corrected_exp_avg * lr
        return param - update, new_state

    rectified = rho_t > 5.0
    # rho_t > 5 implies rho_inf > rho_t > 5, so every factor of the rectification is
    # positive; elsewhere both are swapped for 6, which makes it exactly 1 and its
    # gradient finite (the unused branch still receives a zero gradient from where).
    rect = _rectification(torch.where(rectified, rho_t, 6.0), torch.where(rectified, rho_inf, 6.0))
    scale = torch.where(rectified, rect * adaptive_lr(), 1.0)
    return param - bias_corrected_exp_avg * lr * scale, new_state


def _rectification(rho_t: Scalar, rho_inf: Scalar) -> Scalar:
    """RAdam's variance rectification term ``r_t``, for ``rho_t > 5``."""
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


# ---------------------------------------------------------------------------------------------
# Multi-tensor variants. Each advances all the tensors of one parameter group at once with torch's
# multi-tensor ops (``_compat.foreach_*``), as ``torch.optim.X(..., foreach=True)`` does: one
# autograd node per operation for the whole group instead of one per tensor, which shortens the
# backward pass through an unrolled loop (its main cost for small models). Same contract,
# hyperparameters and state as the single-tensor rule, over lists: ``update(params, grads, states,
# **hyper) -> (new_params, new_states)``. Values equal torch.optim's foreach path and the
# single-tensor rule (on CPU both run the same per-tensor kernels; the tests check it bit for
# bit). A tensor ``lr`` goes through list-by-list products with ``[lr] * n`` (``_foreach_mul``
# with one tensor has no derivative for that tensor in torch 2.13), in the single-tensor rule's
# order of operations; ``UpdateRule.select_foreach`` says when these variants run.


def _many(value: Any, n: int) -> list[Any]:
    return [value] * n


def _foreach_axpy(xs: list[Tensor], ys: list[Tensor], alpha: Scalar) -> list[Tensor]:
    """``[x + alpha * y]``, rounded as :func:`_axpy` rounds it."""
    if not _is_tensor(alpha):
        return list(_compat.foreach_add(xs, ys, alpha=alpha))
    return list(_compat.foreach_add(xs, _compat.foreach_mul(_many(alpha, len(ys)), ys)))


def _foreach_safe_sqrt(xs: list[Tensor]) -> list[Tensor]:
    """:func:`_safe_sqrt` of every tensor: equal values, and derivative 0 where ``x == 0``.

    Zeros are shifted to one before the root and the root is multiplied by 0 there (by 1
    elsewhere, which changes no value): two list operations instead of two ``where`` per tensor.
    """
    if not any(x.requires_grad for x in xs):
        return list(_compat.foreach_sqrt(xs))
    with torch.no_grad():
        zero = [(x == 0).to(x.dtype) for x in xs]
        nonzero = [1 - z for z in zero]
    return list(_compat.foreach_mul(_compat.foreach_sqrt(_compat.foreach_add(xs, zero)), nonzero))


#: Dtypes whose CPU ``addcdiv`` rounds after each of its operations, as separate ops do.
_ROUNDS_EVERY_OP = (torch.float32, torch.float64)


def sgd_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[State],
    *,
    lr: Scalar = 1e-3,
    momentum: Scalar = 0,
    dampening: Scalar = 0,
    weight_decay: Scalar = 0,
    nesterov: bool = False,
    maximize: bool = False,
) -> tuple[list[Tensor], list[State]]:
    """:func:`sgd` for a list of tensors at once; compared with ``torch.optim.SGD(...,
    foreach=True)``. Same arguments (over lists) and state."""
    if maximize:
        grads = list(_compat.foreach_neg(grads))
    if not _is_zero(weight_decay):
        grads = _foreach_axpy(grads, params, weight_decay)
    new_states = [dict(s) for s in states]
    if not _is_zero(momentum):
        old: list[Optional[Tensor]] = [s.get("momentum_buffer") for s in states]
        present = [b for b in old if b is not None]
        if not present:
            bufs = grads
        elif len(present) == len(old):
            bufs = _foreach_axpy(list(_compat.foreach_mul(present, momentum)), grads, 1 - dampening)
        else:  # some tensors already have a buffer (a warm start with partial state)
            bufs = [
                g if b is None else _axpy(b * momentum, g, 1 - dampening)
                for b, g in zip(old, grads)
            ]
        for s, b in zip(new_states, bufs):
            s["momentum_buffer"] = b
        grads = _foreach_axpy(grads, bufs, momentum) if nesterov else bufs
    return _foreach_axpy(params, grads, -lr), new_states


def adam_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[State],
    *,
    lr: Scalar = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> tuple[list[Tensor], list[State]]:
    """:func:`adam` for a list of tensors at once; compared with ``torch.optim.Adam(...,
    foreach=True)``. Same arguments (over lists; ``betas`` Python numbers) and state."""
    beta1, beta2 = betas
    n = len(params)
    steps = [_next_step(s) for s in states]
    if maximize:
        grads = list(_compat.foreach_neg(grads))
    if not _is_zero(weight_decay):
        if decoupled_weight_decay:
            factor = 1 - lr * weight_decay
            if _is_tensor(factor):
                params = list(_compat.foreach_mul(params, _many(factor, n)))
            else:
                params = list(_compat.foreach_mul(params, factor))
        else:
            grads = _foreach_axpy(grads, params, weight_decay)
    exp_avgs = [_zeros_like(s, "exp_avg", p) for s, p in zip(states, params)]
    exp_avg_sqs = [_zeros_like(s, "exp_avg_sq", p) for s, p in zip(states, params)]
    exp_avgs = list(_compat.foreach_lerp(exp_avgs, grads, 1 - beta1))
    exp_avg_sqs = list(
        _compat.foreach_addcmul(_compat.foreach_mul(exp_avg_sqs, beta2), grads, grads, 1 - beta2)
    )
    new_states = [
        {**s, "step": t, "exp_avg": m, "exp_avg_sq": v}
        for s, t, m, v in zip(states, steps, exp_avgs, exp_avg_sqs)
    ]
    second_moments = exp_avg_sqs
    if amsgrad:
        maxima = [_zeros_like(s, "max_exp_avg_sq", p) for s, p in zip(states, params)]
        second_moments = list(_compat.foreach_maximum(maxima, exp_avg_sqs))
        for s, v in zip(new_states, second_moments):
            s["max_exp_avg_sq"] = v
    bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
    denoms = _compat.foreach_add(
        _compat.foreach_div(_foreach_safe_sqrt(second_moments), bias_correction2_sqrt), eps
    )
    # ``param + step_size * exp_avg / denom``, in the order of operations (and so the rounding)
    # of ``addcdiv``'s CPU kernel: ``_foreach_addcdiv`` has no working derivative in torch 2.13
    # for tensors of different shapes.
    if not _is_tensor(lr):
        step_sizes = [-(lr / (1 - beta1**t)) for t in steps]
        if not all(p.dtype in _ROUNDS_EVERY_OP for p in params):
            # float16 and bfloat16: addcdiv computes in float32 and rounds once, where three
            # list operations would round three times.
            new_params = [
                torch.addcdiv(p, m, d, value=v)
                for p, m, d, v in zip(params, exp_avgs, denoms, step_sizes)
            ]
            return new_params, new_states
        scaled = _compat.foreach_mul(exp_avgs, step_sizes)
    else:
        # One tensor step size per distinct step (usually one for the whole group), so that
        # the graph holds one node per operation, not one per tensor.
        negated: dict[int, Tensor] = {}
        for t in steps:
            if t not in negated:
                negated[t] = -(lr / (1 - beta1**t))
        scaled = _compat.foreach_mul([negated[t] for t in steps], exp_avgs)
    return list(_compat.foreach_add(params, _compat.foreach_div(scaled, denoms))), new_states


def adamw_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[State],
    *,
    lr: Scalar = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = True,
) -> tuple[list[Tensor], list[State]]:
    """:func:`adamw` for a list of tensors at once; compared with ``torch.optim.AdamW(...,
    foreach=True)``.

    Raises:
        ValueError: if ``decoupled_weight_decay`` is not True.
    """
    _check_decoupled(decoupled_weight_decay)
    return adam_foreach(
        params,
        grads,
        states,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
    )


def _rule(
    update: Callable[..., tuple[Tensor, State]],
    higher: Optional[Callable[..., tuple[Tensor, State]]] = None,
    foreach: Optional[Callable[..., tuple[list[Tensor], list[State]]]] = None,
) -> UpdateRule:
    """Pair ``update`` with its keyword-only parameters, the one list of its hyperparameters,
    and with its higher-numerics and multi-tensor variants, which must take the same ones."""
    parameters = inspect.signature(update).parameters.values()
    keys = tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)
    for variant in (higher, foreach):
        if variant is None:
            continue
        other = inspect.signature(variant).parameters.values()
        if tuple(p for p in other if p.kind is inspect.Parameter.KEYWORD_ONLY) != tuple(
            p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY
        ):
            raise TypeError(f"{variant.__name__} must take the same arguments as {update.__name__}")
    return UpdateRule(update, keys, higher, foreach)


OPTIMIZERS: dict[type[torch.optim.Optimizer], UpdateRule] = {
    torch.optim.SGD: _rule(sgd, sgd_higher, sgd_foreach),
    torch.optim.Adam: _rule(adam, adam_higher, adam_foreach),
    torch.optim.AdamW: _rule(adamw, foreach=adamw_foreach),
    torch.optim.Adadelta: _rule(adadelta, adadelta_higher),
    torch.optim.Adagrad: _rule(adagrad, adagrad_higher),
    torch.optim.Adamax: _rule(adamax, adamax_higher),
    torch.optim.ASGD: _rule(asgd, asgd_higher),
    torch.optim.RMSprop: _rule(rmsprop, rmsprop_higher),
    torch.optim.Rprop: _rule(rprop, rprop_higher),
    torch.optim.NAdam: _rule(nadam),
    torch.optim.RAdam: _rule(radam),
}
"""The registry of built-in optimizers: every ``torch.optim`` class with a differentiable
version, and its rule. ``higher_func.optim`` makes ``Differentiable<Name>`` from each entry and
maps the class to it for ``get_diff_optim``; the tests check every entry. Adding an optimizer
is writing its rule above and adding its line here."""

RULES: dict[str, UpdateRule] = {rule.update.__name__: rule for rule in OPTIMIZERS.values()}
"""Every rule, keyed by the lower-case name of its ``torch.optim`` class (its function's name)."""
