"""The JSON log format, record by record: no handler, no process, no event loop."""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys

from streamchat.logformat import JsonFormatter, json_config, json_line
from streamchat.sessionlog import TAGGED_LOGGERS, SessionLog


class _Keep(logging.Handler):
    """Keeps each record it is given, formatted by :class:`JsonFormatter`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _logged(
    logger: logging.Logger,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger],
    *args: object,
    **kwargs: object,
) -> dict[str, object]:
    keep = _Keep()
    logger.addHandler(keep)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        log.info(*args, **kwargs)  # type: ignore[arg-type]
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    (line,) = keep.lines
    assert "\n" not in line
    record = json.loads(line)
    assert isinstance(record, dict)
    return record


def test_a_session_line_carries_the_session_as_a_field() -> None:
    """A line logged through a session's adapter has the id as ``session``, its message
    without the text format's ``session <id>:`` prefix, ISO 8601 UTC time, and its extras."""
    logger = logging.getLogger("streamchat.test.logformat")
    record = _logged(
        logger, SessionLog(logger, "s-1f2e"), "asked %s", "q1", extra={"frames": 3, "when": b"x"}
    )
    assert record["session"] == "s-1f2e"
    assert record["message"] == "asked q1"
    assert record["level"] == "INFO" and record["logger"] == "streamchat.test.logformat"
    assert record["frames"] == 3 and record["when"] == "b'x'"  # what JSON cannot say, as str
    time = str(record["time"])
    assert time.endswith("Z")
    moment = datetime.datetime.fromisoformat(time.replace("Z", "+00:00"))
    assert moment.utcoffset() == datetime.timedelta(0)


def test_a_lower_layer_line_in_a_session_task_carries_the_session() -> None:
    """A decoder's line, logged where a session tagged its context, carries that session."""
    logger = logging.getLogger(TAGGED_LOGGERS[0])

    def in_session() -> dict[str, object]:
        SessionLog(logger, "s-77").tag_task()
        return _logged(logger, logger, "frame %d decoded", 4)

    record = contextvars.copy_context().run(in_session)
    assert record["session"] == "s-77" and record["message"] == "frame 4 decoded"
    plain = _logged(logger, logger, "no session here")
    assert "session" not in plain and plain["message"] == "no session here"


def test_an_exception_is_one_field_on_one_line() -> None:
    """A traceback goes in ``exception``, escaped: the record stays one line."""
    logger = logging.getLogger("streamchat.test.logformat")
    try:
        raise ValueError("broken")
    except ValueError:
        record = _logged(logger, logger, "failed", exc_info=sys.exc_info())
    assert "Traceback" in str(record["exception"]) and "ValueError: broken" in str(
        record["exception"]
    )


def test_lines_written_outside_logging_become_json() -> None:
    """A JSON line (a child's log record) passes as it is; other text is wrapped with its
    stream as ``logger``; a progress bar shows its last state; a blank line is dropped."""
    own = '{"time": "t", "level": "INFO", "logger": "vllm", "message": "m"}\n'
    assert json_line(own, "stderr") == own.rstrip("\n")
    wrapped = json.loads(json_line("[W utils.cpp:68] Warning: NUMA binding\n", "stderr") or "")
    assert wrapped["logger"] == "stderr" and wrapped["level"] == "WARNING"
    assert wrapped["message"] == "[W utils.cpp:68] Warning: NUMA binding"
    bar = json.loads(json_line("Loading:   0% | 0/1\rLoading: 100% | 1/1\r\n", "stdout") or "")
    assert bar["message"] == "Loading: 100% | 1/1" and bar["level"] == "INFO"
    assert json.loads(json_line("{not json\n", "stderr") or "")["message"] == "{not json"
    assert json_line("   \n", "stderr") is None


def test_the_configuration_for_vllm_can_be_written_as_json() -> None:
    """The configuration vLLM reads from a file survives JSON, and leaves vLLM's and uvicorn's
    loggers no handler of their own: their lines reach the root's JSON handler."""
    config = json.loads(json.dumps(json_config("debug")))
    assert config["root"]["level"] == "DEBUG"
    for name in ("vllm", "uvicorn", "uvicorn.access", "uvicorn.error"):
        assert config["loggers"][name]["handlers"] == [], name
        assert config["loggers"][name]["propagate"] is True, name
