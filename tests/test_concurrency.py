"""Prediction never blocks the event loop, requests are batched, and overload is refused."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from support import ROOT, AppProcess, image_bytes, synthetic_image

from app.serving.batcher import InferenceWorker, Overloaded


@pytest.fixture(scope="module")
def slow_export(tiny_export, tmp_path_factory):
    """The tiny model with a layer that sleeps 3 s in every forward pass."""
    from fastai.learner import load_learner
    from slow_layer import Sleep
    from torch import nn

    learn = load_learner(tiny_export, cpu=True)
    learn.model = nn.Sequential(Sleep(), learn.model)
    path = tmp_path_factory.mktemp("slow") / "export.pkl"
    learn.export(path)
    return path


def start_slow(slow_export, log_dir, **env) -> AppProcess:
    # Served with torch: the sleep would not survive ONNX export.
    env = {"MODEL_PATH": str(slow_export), "INFERENCE_BACKEND": "torch", "QUEUE_SIZE": "2", "MAX_BATCH": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), **env}
    app = AppProcess(env, log_dir / "server.log")
    return app.wait_ready(timeout=180)  # the start-up self-check runs the slow model too


@pytest.fixture(scope="module")
def slow_server(slow_export, tmp_path_factory):
    app = start_slow(slow_export, tmp_path_factory.mktemp("slow-server"))
    yield app
    app.stop()


def test_healthz_answers_promptly_while_a_slow_prediction_runs(slow_server):
    data = image_bytes(synthetic_image((200, 40, 40)))
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pending = pool.submit(requests.post, slow_server.url + "/upload", files={"file": ("a.jpg", data)}, timeout=30)
        time.sleep(0.5)  # the upload is now in the model
        t0 = time.monotonic()
        assert requests.get(slow_server.url + "/healthz", timeout=5).status_code == 200
        health_seconds = time.monotonic() - t0
        assert not pending.done(), "the prediction should still be running"
        resp = pending.result()
    assert resp.status_code == 200
    assert time.monotonic() - started >= 2.5  # it really was slow
    assert health_seconds < 0.5


def test_overload_is_refused_with_503_and_retry_after_then_recovers(slow_server):
    data = image_bytes(synthetic_image((200, 40, 40)))

    def post():
        return requests.post(slow_server.url + "/upload", files={"file": ("a.jpg", data)}, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: post(), range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 2 and statuses.count(503) == 2, statuses  # QUEUE_SIZE=2
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert post().status_code == 200  # load gone: served again


def run_worker(infer, jobs: int, max_batch: int, capacity: int = 100, model_of=lambda i: "model"):
    """`jobs` requests through a worker whose `infer(batch)` ignores the model (or, when `infer`
    takes two arguments, gets it); request i is prepared for `model_of(i)`."""
    two = infer.__code__.co_argcount == 2
    worker = InferenceWorker(infer if two else (lambda model, batch: infer(batch)), max_batch=max_batch,
                             capacity=capacity)
    worker.start()

    async def main():
        async def one(i):
            with worker.admission():
                return await worker.predict(model_of(i), np.full((2,), i, np.float32))

        return await asyncio.gather(*(one(i) for i in range(jobs)))

    try:
        return asyncio.run(main())
    finally:
        worker.stop()


def test_waiting_requests_share_forward_passes_and_get_their_own_rows():
    sizes = []
    gate = threading.Event()

    def infer(batch):
        gate.wait(5)  # hold the first batch so the others queue up behind it
        sizes.append(len(batch))
        return batch * 10

    threading.Timer(0.3, gate.set).start()
    results = run_worker(infer, jobs=9, max_batch=4)
    assert [float(r[0]) for r in results] == [i * 10.0 for i in range(9)]
    assert sum(sizes) == 9
    assert max(sizes) > 1 and all(size <= 4 for size in sizes)  # queued requests were batched


def test_requests_prepared_for_two_models_never_share_a_forward_pass():
    """After a model swap, requests prepared for the old model and the new one may wait together:
    each goes through the model it was prepared for."""
    passes = []
    gate = threading.Event()

    def infer(model, batch):
        gate.wait(5)
        passes.append((model, [int(row[0]) for row in batch]))
        return batch + (100 if model == "new" else 0)

    threading.Timer(0.3, gate.set).start()
    results = run_worker(infer, jobs=10, max_batch=8, model_of=lambda i: "old" if i < 5 else "new")
    assert [float(r[0]) for r in results] == [i + (100.0 if i >= 5 else 0.0) for i in range(10)]
    for model, rows in passes:
        assert all((i >= 5) == (model == "new") for i in rows), passes
    assert any(len(rows) > 1 for _, rows in passes)  # still batched


def test_an_idle_worker_runs_a_single_request_at_once():
    sizes = []
    t0 = time.monotonic()
    run_worker(lambda b: sizes.append(len(b)) or b, jobs=1, max_batch=8)
    assert sizes == [1]
    assert time.monotonic() - t0 < 1


def test_admission_is_bounded():
    worker = InferenceWorker(lambda model, b: b, max_batch=1, capacity=2)
    with worker.admission(), worker.admission():
        assert worker.in_service == 2
        with pytest.raises(Overloaded):
            with worker.admission():
                pass
    assert worker.in_service == 0


def test_a_failing_batch_reports_the_error_and_the_worker_goes_on():
    calls = []

    def infer(model, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return batch

    worker = InferenceWorker(infer, max_batch=1, capacity=10)
    worker.start()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            asyncio.run(worker.predict("model", np.zeros(1, np.float32)))
        assert asyncio.run(worker.predict("model", np.ones(1, np.float32)))[0] == 1
    finally:
        worker.stop()


def in_service(server) -> float:
    for line in requests.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("inference_in_service "):
            return float(line.split()[1])
    raise AssertionError("no inference_in_service metric")


def test_a_client_that_disconnects_mid_prediction_leaks_nothing(slow_server):
    data = image_bytes(synthetic_image((40, 60, 200)))
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(slow_server.url + "/upload", files={"file": ("a.jpg", data)}, timeout=0.5)
    deadline = time.monotonic() + 10
    while in_service(slow_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert in_service(slow_server) == 0
    resp = requests.post(slow_server.url + "/upload", files={"file": ("a.jpg", data)}, timeout=30)
    assert resp.status_code == 200


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(slow_export, tmp_path):
    app = start_slow(slow_export, tmp_path)
    data = image_bytes(synthetic_image((200, 40, 40)))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, app.url + "/upload", files={"file": ("a.jpg", data)}, timeout=30)
        time.sleep(0.7)  # in the model now
        app.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(requests.ConnectionError):
            requests.get(app.url + "/healthz", timeout=2)
        assert pending.result().status_code == 200  # the in-flight prediction was answered
    assert app.proc.wait(30) == 0
    assert "Traceback" not in app.log()
