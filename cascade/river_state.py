"""River's linear models as snapshot data trees, and back.

Only what this project builds is supported: ``SoftmaxRegression`` (the logistic tier) and
``LogisticRegression`` (the deferral policy), with their default losses and initializer, no L1,
and an AdaGrad or SGD optimizer at a constant learning rate; anything else is a TypeError when
writing, not a silently incomplete snapshot. Everything ``learn_one`` reads or changes is stored:
weights, intercept, each optimizer's step count and AdaGrad's accumulated squared gradients, so a
restored model goes on learning exactly as the original. Weights keep their dicts' order, the
order river sums dot products in. Feature names are ints (hash buckets, feature indices).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
from river import drift, linear_model, optim, utils

from cascade.snapshots import SnapshotError, array, count, field, number

_OPTIMIZERS: dict[str, type[optim.base.Optimizer]] = {"AdaGrad": optim.AdaGrad, "SGD": optim.SGD}


_INT32 = np.iinfo(np.int32)


def _sparse(d: dict[Any, Any]) -> dict[str, np.ndarray]:
    keys = np.fromiter(d.keys(), dtype=np.int64, count=len(d))
    if len(keys) and _INT32.min <= keys.min() and keys.max() <= _INT32.max:
        keys = keys.astype(np.int32)  # hash buckets fit: the logistic tier's snapshot a quarter smaller
    return {"keys": keys, "values": np.fromiter(d.values(), dtype=np.float64, count=len(d))}


def _sparse_items(tree: Any, key: str) -> list[tuple[int, float]]:
    sub = field(tree, key, dict)
    keys = array(sub, "keys", "iu", (None,))
    values = array(sub, "values", "f", (len(keys),))
    return list(zip(keys.tolist(), values.tolist()))  # Python ints and floats, as learning made them


def optimizer_state(opt: optim.base.Optimizer) -> dict[str, Any]:
    name = type(opt).__name__
    if name not in _OPTIMIZERS or type(opt.lr) is not optim.schedulers.Constant:
        raise TypeError(f"cannot snapshot a {opt!r}: only AdaGrad or SGD at a constant learning rate")
    state: dict[str, Any] = {"type": name, "lr": float(opt.lr.learning_rate), "n_iterations": opt.n_iterations}
    if isinstance(opt, optim.AdaGrad):
        state.update(eps=float(opt.eps), g2=_sparse(opt.g2))
    return state


def optimizer_from_state(tree: Any) -> optim.base.Optimizer:
    name = field(tree, "type", str)
    if name not in _OPTIMIZERS:
        raise SnapshotError(f"snapshot optimizer {name!r} is not one of {sorted(_OPTIMIZERS)}")
    opt: optim.base.Optimizer
    if name == "AdaGrad":
        opt = optim.AdaGrad(number(tree, "lr"), eps=number(tree, "eps"))
        opt.g2 = collections.defaultdict(float, _sparse_items(tree, "g2"))
    else:
        opt = optim.SGD(number(tree, "lr"))
    opt.n_iterations = count(tree, "n_iterations")  # a scheduler's clock; constant rates ignore it
    return opt


def softmax_state(model: linear_model.SoftmaxRegression) -> dict[str, Any]:
    if type(model.loss) is not optim.losses.CrossEntropy or model.loss.class_weight:
        raise TypeError(f"cannot snapshot a softmax regression with loss {model.loss!r}")
    classes = []
    for label, weights in model.weights.items():
        if not isinstance(label, str):
            raise TypeError(f"cannot snapshot a softmax regression with label {label!r}: labels are str")
        # .get: every learned label has its optimizer; a missing one would be a fresh copy of the prototype.
        opt = model.optimizers.get(label, model.optimizer)
        classes.append({"label": label, "weights": _sparse(weights), "optimizer": optimizer_state(opt)})
    # The prototype optimizer is what labels learned for the first time start from.
    return {"l2": float(model.l2), "optimizer": optimizer_state(model.optimizer), "classes": classes}


def softmax_from_state(tree: Any) -> linear_model.SoftmaxRegression:
    model = linear_model.SoftmaxRegression(optimizer=optimizer_from_state(field(tree, "optimizer", dict)), l2=number(tree, "l2"))
    for cls in field(tree, "classes", list):
        label = field(cls, "label", str)
        model.weights[label] = collections.defaultdict(float, _sparse_items(cls, "weights"))
        model.optimizers[label] = optimizer_from_state(field(cls, "optimizer", dict))
    return model


def logistic_state(model: linear_model.LogisticRegression) -> dict[str, Any]:
    if model.l1 or type(model.loss) is not optim.losses.Log or type(model.initializer) is not optim.initializers.Zeros:
        raise TypeError(f"cannot snapshot {model!r}: L1, another loss or initializer have state not stored")
    if type(model.intercept_lr) is not optim.schedulers.Constant:
        raise TypeError(f"cannot snapshot {model!r}: the intercept's learning rate is not constant")
    return {
        "weights": _sparse(model.weights),
        "intercept": float(model.intercept),
        "intercept_lr": float(model.intercept_lr.learning_rate),
        "l2": float(model.l2),
        "clip_gradient": float(model.clip_gradient),
        "optimizer": optimizer_state(model.optimizer),
    }


def logistic_from_state(tree: Any) -> linear_model.LogisticRegression:
    model = linear_model.LogisticRegression(
        optimizer=optimizer_from_state(field(tree, "optimizer", dict)),
        l2=number(tree, "l2"),
        intercept_lr=number(tree, "intercept_lr"),
        clip_gradient=number(tree, "clip_gradient"),
    )
    model.intercept = number(tree, "intercept")
    model._weights = utils.VectorDict(dict(_sparse_items(tree, "weights")))
    return model


# The ADWIN detector's window lives in river's Rust extension, which exposes no way to build one
# from data (only its own opaque byte format), so a snapshot keeps its parameters and a restored
# policy's drift detection starts on an empty window. The learner, which owns the continuing
# state, keeps its in-memory detector between snapshots; only a restarted learner starts afresh.
_ADWIN_PARAMS = ("delta", "clock", "max_buckets", "min_window_length", "grace_period")


def adwin_state(adwin: drift.ADWIN) -> dict[str, Any]:
    return {name: getattr(adwin, name) for name in _ADWIN_PARAMS}


def adwin_from_state(tree: Any) -> drift.ADWIN:
    delta = number(tree, "delta")
    sizes = {name: count(tree, name) for name in _ADWIN_PARAMS[1:]}
    # Refused here: a zero clock or max_buckets makes the detector panic in its first updates.
    if not 0.0 < delta < 1.0 or min(sizes.values()) < 1 or max(sizes.values()) >= 2**32:
        raise SnapshotError(f"snapshot ADWIN parameters out of range: delta={delta}, {sizes}")
    return drift.ADWIN(delta=delta, **sizes)
