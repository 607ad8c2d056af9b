"""Test-only ClientApp shim shipped in a test FAB: the real MediSyn ClientApp, except that
a SuperNode started with MEDISYN_TEST_NAN=1 corrupts its trained weights with a NaN."""

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
