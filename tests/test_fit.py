"""bnfast.nn.fit / evaluate / predict."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bnfast import nn


def _blobs(n=240, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]])
    y = rng.integers(0, 3, n)
    X = (centers[y] + rng.standard_normal((n, 2)) * 0.5).astype(np.float32)
    return X, y.astype(np.int64)


def _mlp(seed=0, bn=True):
    layers = [nn.Linear(2, 16, rng=seed)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 3, rng=seed + 1)]
    return nn.Sequential(*layers)


def test_fit_reaches_loss_target_and_history():
    X, y = _blobs()
    Xv, yv = _blobs(90, seed=1)
    model = _mlp()
    opt = nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = nn.StepLR(opt, step_size=5, gamma=0.5)
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, epochs=12, batch_size=32, validation_data=(Xv, yv),
                  scheduler=sched, progress=False, seed=0)
    assert set(hist) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
    assert all(len(v) == 12 for v in hist.values())
    assert hist["loss"][-1] < 0.1 < hist["loss"][0]
    assert hist["val_accuracy"][-1] >= 0.95
    assert hist["lr"] == pytest.approx([0.1] * 5 + [0.05] * 5 + [0.025] * 2)
    assert all(s > 0 for s in hist["seconds"])
    assert model.training  # mode before the call is restored
    # the recorded validation figures are what evaluate() gives in eval mode
    ev = nn.evaluate(model, nn.CrossEntropyLoss(), Xv, yv, batch_size=7)
    assert ev["loss"] == pytest.approx(hist["val_loss"][-1], rel=1e-5)
    assert ev["accuracy"] == hist["val_accuracy"][-1]
    assert model.training


def test_fit_regression_with_mse_and_adam():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 3))
    y = (X @ np.array([[1.0], [-2.0], [0.5]]) + 0.3)
    model = nn.Linear(3, 1, dtype=np.float64, rng=0)
    hist = nn.fit(model, nn.MSELoss(), nn.Adam(model.parameters(), lr=0.05), X, y, epochs=30, batch_size=20,
                  progress=False, seed=0)
    assert set(hist) == {"loss", "lr", "seconds"}
    assert hist["loss"][-1] < 1e-3
    np.testing.assert_allclose(model.weight, [[1.0, -2.0, 0.5]], atol=0.02)


def test_fit_is_reproducible_with_seed():
    X, y = _blobs()
    runs = []
    for _ in range(2):
        model = _mlp(seed=3)
        runs.append(nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.05), X, y, epochs=2,
                           batch_size=16, progress=False, seed=7)["loss"])
    assert runs[0] == runs[1]


def test_eval_mode_is_kept_and_used_for_validation():
    X, y = _blobs(64)
    model = _mlp().eval()
    calls = []
    bn = model[1]
    orig = bn.forward

    def spy(x):
        calls.append(bn.training)
        return orig(x)

    bn.forward = spy
    nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.01), X, y, epochs=1, batch_size=32,
           validation_data=(X, y), progress=False)
    assert calls == [True, True, False]  # two training batches, one validation batch
    assert not model.training and not bn.training


def test_predict_and_evaluate():
    X, y = _blobs(50)
    model = _mlp()
    out = nn.predict(model, X, batch_size=16)
    assert out.shape == (50, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, model.eval()(X), rtol=1e-6)
    model.train()
    res = nn.evaluate(model, nn.CrossEntropyLoss(), X, y)
    assert set(res) == {"loss", "accuracy"} and 0 <= res["accuracy"] <= 1
    assert model.training


def test_progress_plain_fallback_and_quiet(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # force the plain fallback
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    X, y = _blobs(64)
    model = _mlp()
    nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.01), X, y, epochs=2, batch_size=32,
           progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Epoch 1/2" in captured.err and "Epoch 2/2" in captured.err and "loss" in captured.err
    nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.01), X, y, epochs=2, batch_size=32,
           progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_uses_tqdm_when_available(capsys):
    pytest.importorskip("tqdm")
    X, y = _blobs(64)
    model = _mlp()
    nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.01), X, y, epochs=1, batch_size=32)
    assert "Epoch 1/1" in capsys.readouterr().err


def test_progress_calls_tqdm_api(monkeypatch):
    import types

    events = []

    class FakeTqdm:
        def __init__(self, total, desc, file, leave, unit):
            events.append(("init", total, desc))

        def update(self, n):
            events.append(("update", n))

        def set_postfix(self, **kw):
            events.append(("postfix", sorted(kw)))

        def set_postfix_str(self, s, refresh=True):
            events.append(("summary", s))

        def close(self):
            events.append(("close",))

    fake = types.ModuleType("tqdm.auto")
    fake.tqdm = FakeTqdm
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake)
    X, y = _blobs(64)
    model = _mlp()
    nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.01), X, y, epochs=1, batch_size=32)
    assert events[0] == ("init", 2, "Epoch 1/1")
    assert [e[0] for e in events].count("update") == 2
    assert events[-2][0] == "summary" and "accuracy" in events[-2][1] and events[-1] == ("close",)


def test_fit_errors():
    X, y = _blobs(64)
    model = _mlp()
    ce = nn.CrossEntropyLoss()
    opt = nn.SGD(model.parameters(), lr=0.01)
    kw = dict(epochs=1, batch_size=16, progress=False)
    with pytest.raises(ValueError, match="64 samples but y has 63"):
        nn.fit(model, ce, opt, X, y[:-1], **kw)
    with pytest.raises(ValueError, match="batch_size"):
        nn.fit(model, ce, opt, X, y, epochs=1, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="integer class indices"):
        nn.fit(model, ce, opt, X, y.astype(np.float32), **kw)
    with pytest.raises(ValueError, match="label 3 is out of range for 3 classes"):
        nn.fit(model, ce, opt, X, np.where(y == 2, 3, y), **kw)
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 2\)"):
        nn.fit(model, ce, opt, np.zeros((64, 5), np.float32), y, **kw)
    with pytest.raises(ValueError, match="validation_data"):
        nn.fit(model, ce, opt, X, y, validation_data=X, **kw)
    assert model.training  # restored even after an error


def test_drop_last_avoids_single_sample_batch_norm_batch():
    X, y = _blobs(33)
    model = _mlp()
    opt = nn.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, epochs=1, batch_size=16, progress=False, shuffle=False)
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, epochs=1, batch_size=16, progress=False,
                  drop_last=True)
    assert len(hist["loss"]) == 1
