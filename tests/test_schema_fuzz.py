"""Schemathesis against the server's own OpenAPI schema: no input makes it answer 5xx.

Bounded (a couple of dozen generated requests per operation) so that it fits in CI.
Driven through hypothesis directly: schemathesis' pytest plugin does not load under
pytest 9.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

EXAMPLES_PER_OPERATION = 20


def test_no_generated_request_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/images/generations",
                                             "/v1/images/edits", "/v1/models"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  print_blob=True, suppress_health_check=list(HealthCheck))
        def no_server_error(case) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=120)

        no_server_error()
