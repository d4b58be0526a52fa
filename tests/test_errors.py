"""Errors keep their fields across Ray (they are pickled between replicas), and a server
fault's 500 names a reference an operator can find in the log: the request id."""

from __future__ import annotations

import logging
import pickle

import pytest
from ray.serve.context import _RequestContext, _serve_request_context

from serve_app.errors import InvalidRequest, Overloaded, ServerError
from serve_app.http_errors import as_api_error


def test_an_error_crosses_pickling_whole_and_prints_its_message() -> None:
    error = Overloaded("busy", param="model", code="model_starting", headers={"Retry-After": "10"})
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is Overloaded and str(copy) == "busy"
    assert (copy.message, copy.param, copy.code, copy.headers) == ("busy", "model", "model_starting",
                                                                    {"Retry-After": "10"})
    assert str(InvalidRequest("bad n", param="n")) == "bad n"  # not the tuple of every argument


def test_a_server_fault_is_a_generic_500_whose_reference_is_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    token = _serve_request_context.set(_RequestContext(request_id="req-1234"))
    try:
        with caplog.at_level(logging.ERROR, logger="ray.serve"):
            error = as_api_error(KeyError("internal detail"))
    finally:
        _serve_request_context.reset(token)
    assert isinstance(error, ServerError) and error.status_code == 500
    assert error.message == "Internal server error (reference req-1234)." and "internal detail" not in error.message
    [record] = [r for r in caplog.records if "req-1234" in r.getMessage()]
    assert record.exc_info and isinstance(record.exc_info[1], KeyError)  # the traceback is in the log
