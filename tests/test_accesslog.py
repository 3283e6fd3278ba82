"""The access log's writer (kproxy/accesslog.py): lines written in batches, never lost on
exit, and through logging whenever an app configured the logger its own way."""

from __future__ import annotations

import io
import logging
import time

import pytest

from kproxy import accesslog
from kproxy.record import RequestRecord

from .conftest import wait_until


def finished(request_id: str) -> RequestRecord:
    return RequestRecord("GET", "/p", "127.0.0.1", request_id, time.perf_counter(), status=200)


@pytest.fixture
def access_logger():
    logger = logging.getLogger("kproxy.access")
    saved = logger.handlers[:], logger.propagate, logger.level
    logger.handlers, logger.propagate = [], False
    logger.setLevel(logging.INFO)
    yield logger
    for handler in logger.handlers:
        handler.close()
    logger.handlers, logger.propagate, logger.level = saved[0], saved[1], saved[2]


def test_lines_are_written_within_the_flush_interval_and_all_on_close(access_logger):
    stream = io.StringIO()
    handler = accesslog.AccessLogHandler(stream, flush_interval=0.2)
    access_logger.addHandler(handler)
    log_line = accesslog.observer("text")
    log_line(finished("first"))
    wait_until(lambda: "rid=first" in stream.getvalue(), timeout=3)
    for i in range(3):
        log_line(finished(f"late-{i}"))
    handler.close()
    lines = stream.getvalue().splitlines()
    assert [line.rsplit("rid=", 1)[1] for line in lines] == ["first", "late-0", "late-1", "late-2"]


def test_a_full_buffer_is_written_at_once(access_logger):
    stream = io.StringIO()
    handler = accesslog.AccessLogHandler(stream, flush_interval=60)
    access_logger.addHandler(handler)
    log_line = accesslog.observer("text")
    for i in range(2000):  # ~100 bytes each: past the 64 KiB buffer
        log_line(finished(f"n{i}"))
    assert len(stream.getvalue()) >= accesslog.AccessLogHandler.BUFFER


def test_an_app_that_configures_the_logger_gets_log_records(access_logger):
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
    access_logger.addHandler(Collect())
    accesslog.observer("json")(finished("through-logging"))
    assert len(records) == 1 and '"request_id":"through-logging"' in records[0].getMessage()
