"""A user's script over bnfast's public API, checked by ``mypy --strict``
(tests/test_typing.py).  Every result is annotated with the type mypy must
infer, and ``reveal_type`` lines let the test read what mypy sees: ndarray
types and bnfast classes, never ``Any``.  It also runs as a plain script."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

import bnfast
from bnfast import nn

rng = np.random.default_rng(0)
x: npt.NDArray[np.float32] = rng.standard_normal((8, 4, 5, 5)).astype(np.float32)
C = x.shape[1]
w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
running_mean, running_var = np.zeros(C, np.float32), np.ones(C, np.float32)

# functional ops
y, save_mean, save_invstd = bnfast.batch_norm_forward(x, w, b, running_mean, running_var, momentum=0.1)
y_eval = bnfast.batch_norm_inference(x, running_mean, running_var, w, b, eps=1e-5, axis=1)
grad_x, grad_w, grad_b = bnfast.batch_norm_backward(np.ones_like(y), x, save_mean, save_invstd, w)
y_torchlike = bnfast.batch_norm(x, running_mean, running_var, w, b, training=True, axis=1)
y_out = bnfast.batch_norm_inference([[1.0, 2.0], [3.0, 4.0]], [0.0, 0.0], [1.0, 1.0], out=None)
bnfast.set_num_threads(1)
threads: int = bnfast.get_num_threads()
bnfast.set_num_threads(None)

# moments
m = bnfast.moments(x).merge(bnfast.moments(x[:2]))
var_per_channel = m.var(ddof=1)
empty = bnfast.Moments.zeros(C)
pieces = bnfast.Moments(np.array([3]), np.array([1.0]), np.array([0.5]))

# layers, recalibration, folding
bn = bnfast.BatchNorm2d(C, momentum=0.1)
out_train = bn(x)
grad_in = bn.backward(np.ones_like(out_train))
bn.eval()
out_eval = bn.forward(x)
state = bn.state_dict()
params: list[bnfast.Parameter] = bn.parameters()
fold_w, fold_b = bnfast.fold_batch_norm(rng.standard_normal((C, 3, 3, 3)), np.zeros(C), bn)

# nn training helper
model = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 16, rng=0), nn.BatchNorm1d(16), nn.ReLU(),
                      nn.Linear(16, 3, rng=1))  # fmt: skip
loss = nn.CrossEntropyLoss()
optimizer = nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
labels = np.zeros(8, np.int64)
logits = model(x)
value = loss(logits, labels)
optimizer.zero_grad()
grad_model = model.backward(loss.backward())
optimizer.step()
history = nn.fit(model, loss, optimizer, x, labels, epochs=1, batch_size=4, progress=False)
scores = nn.evaluate(model, loss, x, labels)
predicted = nn.predict(model, x)

if TYPE_CHECKING:
    reveal_type(y)  # R: ndarray
    reveal_type(save_mean)  # R: ndarray
    reveal_type(save_invstd)  # R: ndarray
    reveal_type(y_eval)  # R: ndarray
    reveal_type(grad_x)  # R: ndarray
    reveal_type(grad_w)  # R: ndarray
    reveal_type(grad_b)  # R: ndarray
    reveal_type(y_torchlike)  # R: ndarray
    reveal_type(y_out)  # R: ndarray
    reveal_type(m)  # R: Moments
    reveal_type(var_per_channel)  # R: ndarray
    reveal_type(empty)  # R: Moments
    reveal_type(pieces.mean)  # R: ndarray
    reveal_type(out_train)  # R: ndarray
    reveal_type(grad_in)  # R: ndarray
    reveal_type(out_eval)  # R: ndarray
    reveal_type(fold_w)  # R: ndarray
    reveal_type(logits)  # R: ndarray
    reveal_type(value)  # R: float
    reveal_type(grad_model)  # R: ndarray
    reveal_type(predicted)  # R: ndarray
    reveal_type(scores)  # R: dict
    reveal_type(bnfast.__version__)  # R: str
