"""One log shape for every process: UTC text or JSON lines, colour codes removed, known noise dropped."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from citynerve.observability.logs import KNOWN_NOISE, adopt_logger, configure_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.timeout(10)
@pytest.mark.usefixtures("restore_root")
def test_text_lines_are_utc_and_free_of_colour_codes() -> None:
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    logging.getLogger("thirdparty").info("Started a local Ray instance at \x1b[1m\x1b[32mhttp://127.0.0.1:8265\x1b[39m")
    logging.getLogger("citynerve.test").debug("below the level")
    (line,) = out.getvalue().splitlines()
    assert "\x1b" not in line
    assert line.endswith("INFO thirdparty: Started a local Ray instance at http://127.0.0.1:8265")
    assert line[10] == "T"
    assert line[19] == "Z"


@pytest.mark.timeout(10)
@pytest.mark.usefixtures("restore_root")
def test_json_lines_carry_level_logger_message_and_exception() -> None:
    out = io.StringIO()
    configure_logging("WARNING", "json", stream=out)
    error = RuntimeError("boom")
    logging.getLogger("citynerve.operators.city").error(
        "scenario %s failed", "pipe-burst-drill", exc_info=(RuntimeError, error, None))
    entry = json.loads(out.getvalue())
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "citynerve.operators.city"
    assert entry["message"] == "scenario pipe-burst-drill failed"
    assert "RuntimeError: boom" in entry["exception"]


@pytest.mark.timeout(10)
@pytest.mark.usefixtures("restore_root")
def test_known_noise_is_dropped_and_nothing_else() -> None:
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    for name, prefix, reason in KNOWN_NOISE:
        assert reason
        logging.getLogger(f"{name}.reactor").warning("%s.", prefix)
    logging.getLogger("kopf.objects").warning("Patching failed with inconsistencies.")
    (line,) = out.getvalue().splitlines()
    assert line.endswith("WARNING kopf.objects: Patching failed with inconsistencies.")


@pytest.mark.timeout(10)
@pytest.mark.usefixtures("restore_root")
def test_an_unknown_format_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYNERVE_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="'yaml' is not one of text, json"):
        configure_logging("INFO")


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("restore_root")
def test_ray_lines_take_the_process_shape_once_adopted() -> None:
    import ray  # noqa: PLC0415 - importing Ray installs its own handler on the `ray` logger

    del ray
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    adopt_logger("ray")
    logging.getLogger("ray").info("View the dashboard at \x1b[1m\x1b[32m127.0.0.1:8265\x1b[39m")
    assert out.getvalue().rstrip().endswith("INFO ray: View the dashboard at 127.0.0.1:8265")
