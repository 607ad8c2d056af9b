"""Test-only ClientApp installed *at a site* (on its PYTHONPATH): the real MediSyn
ClientApp, except that a site whose worker runs it with MEDISYN_TEST_NAN=1 corrupts its
trained weights with a NaN. The site chooses it (``SiteSupervisor(clientapp=
"nan_clientapp:app")``); the run's FAB stays medisyn's own, so the coordinator's check of
non-finite updates is tested without a coordinator shipping code to sites."""

import os

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp
from medisyn.client.app import app as real_app

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real_app(msg, context)
    if os.environ.get("MEDISYN_TEST_NAN") == "1" and not reply.has_error():
        rec = reply.content["arrays"]
        key = next(iter(rec))
        a = rec[key].numpy().copy()
        a.flat[0] = np.nan
        rec[key] = Array(a)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real_app(msg, context)
