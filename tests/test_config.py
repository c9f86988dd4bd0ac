"""Tests for service/config.py: building the frozen config tree from plain data, reporting every
problem with its dotted path, YAML loading, redaction and exporter names."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import pytest

from service.config import (
    BasicAuthConfig,
    BatchConfig,
    BreakerConfig,
    Config,
    ConfigError,
    LogConfig,
    MiB,
    PRWConfig,
    PRWExporterConfig,
    QueueConfig,
    ReceiverConfig,
    RetryConfig,
    TelemetryConfig,
    config_from_dict,
    exporter_name,
    load_yaml,
    parse_listen,
    redact,
    set_path,
    to_dict,
)

URL = "http://127.0.0.1:9090/api/v1/write"
NO_EXPORTER = (
    "prw.exporters, otlp.exporters: at least one exporter is required "
    "(or --prw-export-url / --otlp-export-endpoint)"
)


def with_exporter(**top: Any) -> dict[str, Any]:
    """A minimal valid config dict, plus `top`; a `prw` mapping in `top` keeps the exporter."""
    prw = top.pop("prw", {})
    if isinstance(prw, dict):
        prw = {"exporters": [{"url": URL}], **prw}
    return {"prw": prw, **top}


def problems_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return info.value.problems


# ---- defaults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, {}])
def test_defaults_are_valid_except_for_the_missing_exporter(data: Any) -> None:
    """Empty input is rejected with exactly one problem: no exporter is configured."""
    assert problems_of(data) == [NO_EXPORTER]


def test_one_exporter_is_enough_and_everything_else_defaults() -> None:
    """With one exporter URL every other setting takes its documented default."""
    cfg = config_from_dict(with_exporter())
    assert cfg == Config(prw=PRWConfig(exporters=[PRWExporterConfig(url=URL)]))
    assert cfg.log == LogConfig(level="info", format="json", rate_limit_interval_s=10.0)
    assert cfg.telemetry == TelemetryConfig(listen=":8888")
    assert cfg.prw.receiver == ReceiverConfig(
        listen=":9091",
        max_request_bytes=8 * MiB,
        max_decompressed_bytes=32 * MiB,
        max_concurrent_requests=16,
        ingest_queue_requests=64,
        ingest_max_bytes=128 * MiB,
        ingest_wait_s=0.5,
        retry_after_s=1,
        keep_alive_max_requests=1_000_000,
        keep_alive_timeout_s=60.0,
        read_timeout_s=30.0,
    )
    assert cfg.prw.batch == BatchConfig(
        max_series=10_000, max_bytes=4 * MiB, interval_s=1.0, ack_linger_s=0.01
    )
    assert cfg.prw.queue == QueueConfig(
        mode="memory",
        max_batches=10_000,
        max_bytes=256 * MiB,
        full_behavior="drop_oldest",
        dir="/var/lib/governor/queue",
        segment_bytes=64 * MiB,
        durable_ack=False,
        sync_interval_s=1.0,
        max_memory_bytes=64 * MiB,
        spill_at=0.8,
    )
    exp = cfg.prw.exporters[0]
    assert exp.retry == RetryConfig(
        initial_delay_s=0.5,
        max_delay_s=30.0,
        multiplier=2.0,
        jitter=0.2,
        max_retry_after_s=300.0,
        max_elapsed_s=0.0,
    )
    assert exp.breaker == BreakerConfig(failure_threshold=5, open_s=5.0, max_open_s=60.0)
    assert (exp.name, exp.timeout_s, exp.workers, exp.headers) == ("", 30.0, 2, {})
    assert exp.basic_auth is None
    assert cfg.shutdown_grace_s == 30.0


def test_config_is_frozen() -> None:
    """Config values cannot be changed after loading."""
    cfg = config_from_dict(with_exporter())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.shutdown_grace_s = 1.0  # type: ignore[misc]


def test_a_full_config_is_built_with_every_value() -> None:
    """Values given for every section end up in the tree, converted to their field types."""
    cfg = config_from_dict(
        {
            "log": {"level": "debug", "format": "logfmt", "rate_limit_interval_s": 2},
            "telemetry": {"listen": "127.0.0.1:0"},
            "prw": {
                "receiver": {"listen": "[::1]:9091", "max_request_bytes": "1MiB"},
                "batch": {"max_series": 500, "max_bytes": 2048, "interval_s": 0.25},
                "queue": {"max_batches": 3, "max_bytes": "1GB", "full_behavior": "drop_oldest"},
                "exporters": [
                    {
                        "url": "https://a.example/api/v1/write",
                        "name": "a",
                        "timeout_s": 5,
                        "workers": 4,
                        "headers": {"X-Scope-OrgID": "tenant"},
                        "basic_auth": {"username": "u", "password": "p"},
                        "retry": {"initial_delay_s": 1, "jitter": 0},
                        "breaker": {"failure_threshold": 1, "open_s": 1, "max_open_s": 1},
                    }
                ],
            },
            "shutdown_grace_s": 7,
        }
    )
    assert cfg.log == LogConfig(level="debug", format="logfmt", rate_limit_interval_s=2.0)
    assert type(cfg.log.rate_limit_interval_s) is float
    assert cfg.telemetry.listen == "127.0.0.1:0"
    assert cfg.prw.receiver.listen == "[::1]:9091"
    assert cfg.prw.receiver.max_request_bytes == MiB
    assert cfg.prw.batch == BatchConfig(max_series=500, max_bytes=2048, interval_s=0.25)
    assert cfg.prw.queue == QueueConfig(
        max_batches=3, max_bytes=1_000_000_000, full_behavior="drop_oldest"
    )
    assert cfg.prw.exporters == [
        PRWExporterConfig(
            url="https://a.example/api/v1/write",
            name="a",
            timeout_s=5.0,
            workers=4,
            headers={"X-Scope-OrgID": "tenant"},
            basic_auth=BasicAuthConfig(username="u", password="p"),
            retry=RetryConfig(initial_delay_s=1.0, jitter=0.0),
            breaker=BreakerConfig(failure_threshold=1, open_s=1.0, max_open_s=1.0),
        )
    ]
    assert cfg.shutdown_grace_s == 7.0


def test_basic_auth_may_be_null() -> None:
    """An explicit null for an optional section means 'not set'."""
    cfg = config_from_dict({"prw": {"exporters": [{"url": URL, "basic_auth": None}]}})
    assert cfg.prw.exporters[0].basic_auth is None


# ---- unknown keys -----------------------------------------------------------------------------


def test_unknown_keys_are_reported_with_their_dotted_path() -> None:
    """Unknown keys at the top, in nested sections and inside list items are all named by path."""
    data = {
        "shutdown_grace": 1,
        "log": {"levle": "info"},
        "prw": {
            "batch": {"max_serie": 1},
            "exporters": [
                {"url": URL},
                {"url": URL + "2", "timeot_s": 1, "retry": {"jiter": 0.1}},
            ],
        },
    }
    assert problems_of(data) == [
        "shutdown_grace: unknown key",
        "log.levle: unknown key",
        "prw.batch.max_serie: unknown key",
        "prw.exporters[1].timeot_s: unknown key",
        "prw.exporters[1].retry.jiter: unknown key",
    ]


def test_unknown_key_in_first_exporter() -> None:
    """The path of a key inside a list item carries the item's index."""
    data = {"prw": {"exporters": [{"url": URL, "timeot_s": 5}]}}
    assert problems_of(data) == ["prw.exporters[0].timeot_s: unknown key"]


def test_required_field_missing() -> None:
    """An exporter without a url is reported as a missing required key."""
    assert problems_of({"prw": {"exporters": [{"name": "x"}]}}) == [
        "prw.exporters[0].url: required"
    ]


# ---- wrong types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"shutdown_grace_s": "soon"}, "shutdown_grace_s: expected a number, got 'soon'"),
        ({"shutdown_grace_s": True}, "shutdown_grace_s: expected a number, got True"),
        ({"shutdown_grace_s": None}, "shutdown_grace_s: expected a number, got None"),
        (
            {"prw": {"batch": {"max_series": 1.5}}},
            "prw.batch.max_series: expected an integer, got 1.5",
        ),
        (
            {"prw": {"batch": {"max_series": "10"}}},
            "prw.batch.max_series: expected an integer, got '10'",
        ),
        (
            {"prw": {"batch": {"max_series": False}}},
            "prw.batch.max_series: expected an integer, got False",
        ),
        (
            {"prw": {"queue": {"max_bytes": True}}},
            "prw.queue.max_bytes: expected an integer, got True",
        ),
        ({"telemetry": {"listen": 8888}}, "telemetry.listen: expected a string, got 8888"),
        ({"log": "debug"}, "log: expected a mapping, got str"),
        ({"prw": {"batch": [1]}}, "prw.batch: expected a mapping, got list"),
        ({"prw": None}, "prw: expected a mapping, got NoneType"),
    ],
)
def test_wrong_types_are_reported(data: dict[str, Any], problem: str) -> None:
    """A value of the wrong type is one problem naming the path and the value."""
    assert problems_of(with_exporter(**data)) == [problem]


def test_wrong_types_in_the_exporter_list() -> None:
    """The exporter list, its items and the headers mapping are type-checked."""
    assert problems_of({"prw": {"exporters": {"url": URL}}}) == [
        "prw.exporters: expected a list, got dict"
    ]
    assert problems_of({"prw": {"exporters": [URL]}}) == [
        "prw.exporters[0]: expected a mapping, got str"
    ]
    assert problems_of({"prw": {"exporters": [{"url": URL, "headers": {"X-N": 1}}]}}) == [
        "prw.exporters[0].headers: expected a mapping of strings to strings"
    ]
    assert problems_of({"prw": {"exporters": [{"url": URL, "headers": ["a"]}]}}) == [
        "prw.exporters[0].headers: expected a mapping of strings to strings"
    ]
    assert problems_of({"prw": {"exporters": [{"url": URL, "workers": "2"}]}}) == [
        "prw.exporters[0].workers: expected an integer, got '2'"
    ]


# ---- Literal choices --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"log": {"level": "loud"}},
            "log.level: 'loud' is not one of debug, info, warning, error",
        ),
        ({"log": {"level": "INFO"}}, "log.level: 'INFO' is not one of debug, info, warning, error"),
        ({"log": {"format": "text"}}, "log.format: 'text' is not one of json, logfmt"),
        (
            {"prw": {"queue": {"mode": "ram"}}},
            "prw.queue.mode: 'ram' is not one of memory, disk, hybrid",
        ),
        (
            {"prw": {"queue": {"full_behavior": "drop"}}},
            "prw.queue.full_behavior: 'drop' is not one of block, drop_oldest, drop_newest",
        ),
    ],
)
def test_literal_choices(data: dict[str, Any], problem: str) -> None:
    """A value outside a fixed set of choices is reported with the allowed choices."""
    assert problems_of(with_exporter(**data)) == [problem]


@pytest.mark.parametrize("behavior", ["block", "drop_oldest", "drop_newest"])
def test_every_full_behavior_is_accepted(behavior: str) -> None:
    """Each documented full_behavior is a valid choice."""
    cfg = config_from_dict(with_exporter(prw={"queue": {"full_behavior": behavior}}))
    assert cfg.prw.queue.full_behavior == behavior


# ---- validators -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"shutdown_grace_s": 0}, "shutdown_grace_s: must be > 0"),
        ({"shutdown_grace_s": -1.5}, "shutdown_grace_s: must be > 0"),
        ({"shutdown_grace_s": math.nan}, "shutdown_grace_s: must be > 0"),
        ({"log": {"rate_limit_interval_s": 0}}, "log.rate_limit_interval_s: must be > 0"),
        ({"prw": {"batch": {"max_series": 0}}}, "prw.batch.max_series: must be > 0"),
        ({"prw": {"batch": {"interval_s": -1}}}, "prw.batch.interval_s: must be > 0"),
        ({"prw": {"queue": {"max_batches": 0}}}, "prw.queue.max_batches: must be > 0"),
        (
            {"prw": {"receiver": {"ingest_wait_s": -0.1}}},
            "prw.receiver.ingest_wait_s: must be >= 0",
        ),
        (
            {"prw": {"receiver": {"ingest_wait_s": math.nan}}},
            "prw.receiver.ingest_wait_s: must be >= 0",
        ),
        (
            {"prw": {"receiver": {"retry_after_s": 0}}},
            "prw.receiver.retry_after_s: must be > 0",
        ),
    ],
)
def test_range_validators(data: dict[str, Any], problem: str) -> None:
    """Values out of range (including NaN) are reported with the rule they break."""
    assert problems_of(with_exporter(**data)) == [problem]


def test_zero_is_allowed_where_the_rule_is_non_negative() -> None:
    """ingest_wait_s and max_elapsed_s accept 0 (answer at once / retry forever)."""
    cfg = config_from_dict(
        {
            "prw": {
                "receiver": {"ingest_wait_s": 0},
                "exporters": [{"url": URL, "retry": {"max_elapsed_s": 0}}],
            }
        }
    )
    assert cfg.prw.receiver.ingest_wait_s == 0.0
    assert cfg.prw.exporters[0].retry.max_elapsed_s == 0.0


@pytest.mark.parametrize(
    ("jitter", "ok"),
    [(0, True), (0.5, True), (1, True), (-0.01, False), (1.01, False), (math.nan, False)],
)
def test_jitter_is_a_fraction(jitter: float, ok: bool) -> None:
    """retry.jitter must lie in [0, 1]."""
    data = {"prw": {"exporters": [{"url": URL, "retry": {"jitter": jitter}}]}}
    if ok:
        assert config_from_dict(data).prw.exporters[0].retry.jitter == jitter
    else:
        assert problems_of(data) == ["prw.exporters[0].retry.jitter: must be between 0 and 1"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (":9091", ("0.0.0.0", 9091)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9091", ("::1", 9091)),
        ("[::]:80", ("::", 80)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_good_listen_addresses(value: str, expected: tuple[str, int]) -> None:
    """host:port, :port (all interfaces) and [v6]:port are accepted and split."""
    assert parse_listen(value) == expected
    cfg = config_from_dict(with_exporter(telemetry={"listen": value}))
    assert cfg.telemetry.listen == value


@pytest.mark.parametrize(
    "value",
    [
        "9091",
        "",
        "localhost",
        "localhost:",
        ":65536",
        ":123456",
        "::1:9091",
        "[::1]",
        "[::1:80",
        "a:b",
    ],
)
def test_bad_listen_addresses(value: str) -> None:
    """Anything that is not host:port with a port in 0..65535 is rejected."""
    with pytest.raises(ValueError, match="is not host:port"):
        parse_listen(value)
    data = with_exporter(prw={"receiver": {"listen": value}})
    assert problems_of(data) == [f"prw.receiver.listen: {value!r} is not host:port"]


@pytest.mark.parametrize("url", ["127.0.0.1:9090/api/v1/write", "ftp://host/x", "http://", ""])
def test_exporter_url_must_be_http(url: str) -> None:
    """An exporter URL needs an http:// or https:// scheme and a host."""
    assert problems_of({"prw": {"exporters": [{"url": url}]}}) == [
        f"prw.exporters[0].url: {url!r} is not an http:// or https:// URL"
    ]


# ---- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1234, 1234),
        ("1234", 1234),
        ("100B", 100),
        ("4KiB", 4096),
        ("64MiB", 64 * 1024 * 1024),
        ("2GiB", 2 * 1024**3),
        ("3KB", 3000),
        ("5MB", 5_000_000),
        ("1GB", 1_000_000_000),
        (" 64 MiB ", 64 * 1024 * 1024),
    ],
)
def test_size_strings_in_bytes_fields(value: Any, expected: int) -> None:
    """*_bytes fields take an integer or a size string with a binary or decimal unit."""
    data = with_exporter(
        prw={
            "receiver": {
                "max_request_bytes": value,
                "max_decompressed_bytes": value,
                "ingest_max_bytes": value,
            },
            "batch": {"max_bytes": value},
            "queue": {"max_bytes": value},
        }
    )
    cfg = config_from_dict(data)
    assert cfg.prw.receiver.max_request_bytes == expected
    assert cfg.prw.receiver.max_decompressed_bytes == expected
    assert cfg.prw.receiver.ingest_max_bytes == expected
    assert cfg.prw.batch.max_bytes == expected
    assert cfg.prw.queue.max_bytes == expected


@pytest.mark.parametrize("value", ["12 parsecs", "1.5MiB", "64mib", "MiB", "-1MiB", "1 TiB"])
def test_bad_size_strings(value: str) -> None:
    """A string that is not a whole number with a known unit is reported as not a size."""
    data = with_exporter(prw={"queue": {"max_bytes": value}})
    assert problems_of(data) == [f"prw.queue.max_bytes: {value!r} is not a size like 64MiB"]


def test_zero_size_string_fails_the_range_check() -> None:
    """'0MiB' parses, then fails the > 0 rule."""
    data = with_exporter(prw={"batch": {"max_bytes": "0MiB"}})
    assert problems_of(data) == ["prw.batch.max_bytes: must be > 0"]


def test_size_strings_only_in_bytes_fields() -> None:
    """Fields whose name does not end in _bytes do not take size strings."""
    data = with_exporter(prw={"queue": {"max_batches": "1KiB"}})
    assert problems_of(data) == ["prw.queue.max_batches: expected an integer, got '1KiB'"]


# ---- cross-field checks -----------------------------------------------------------------------


def test_cross_field_checks_report_every_problem(tmp_path: Path) -> None:
    """Each exporter is checked for conflicting auth and inverted limits, names must be unique,
    and the receiver's decompressed limit must not be below its request limit."""
    token = tmp_path / "token"
    token.write_text("t")
    data = {
        "prw": {
            "receiver": {"max_request_bytes": "2MiB", "max_decompressed_bytes": "1MiB"},
            "exporters": [
                {"url": URL, "bearer_token": "t", "bearer_token_file": str(token)},
                {
                    "url": "http://b/api",
                    "bearer_token_file": str(token),
                    "basic_auth": {"username": "u"},
                    "retry": {"initial_delay_s": 31},
                    "breaker": {"open_s": 61},
                },
                {"url": "http://c/api", "name": "same"},
                {"url": "http://d/api", "name": "same"},
                {"url": "http://user:pw@b/api"},
            ],
        }
    }
    assert problems_of(data) == [
        "prw.exporters[0]: set bearer_token or bearer_token_file, not both",
        "prw.exporters[1]: set bearer token or basic_auth, not both",
        "prw.exporters[1].retry: initial_delay_s is larger than max_delay_s",
        "prw.exporters[1].breaker: open_s is larger than max_open_s",
        "prw.exporters: two exporters are named 'b/api'; give them distinct names",
        "prw.exporters: two exporters are named 'same'; give them distinct names",
        "prw.receiver: max_decompressed_bytes is smaller than max_request_bytes",
    ]


def test_basic_auth_checks(tmp_path: Path) -> None:
    """basic_auth needs a username, and a password or a readable password_file, not both."""
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    missing = tmp_path / "missing"
    data = {
        "prw": {
            "exporters": [
                {"url": "http://a/", "basic_auth": {"username": "u", "password_file": str(pw)}},
                {"url": "http://b/", "basic_auth": {"password": "p"}},
                {
                    "url": "http://c/",
                    "basic_auth": {"username": "u", "password": "p", "password_file": str(pw)},
                },
                {
                    "url": "http://d/",
                    "basic_auth": {"username": "u", "password_file": str(missing)},
                },
                {"url": "http://e/", "bearer_token_file": str(missing)},
            ]
        }
    }
    assert problems_of(data) == [
        "prw.exporters[1].basic_auth.username: required",
        "prw.exporters[2].basic_auth: set password or password_file, not both",
        f"prw.exporters[3].basic_auth.password_file: cannot read {missing}",
        f"prw.exporters[4].bearer_token_file: cannot read {missing}",
    ]
    del data["prw"]["exporters"][1:]
    ba = config_from_dict(data).prw.exporters[0].basic_auth
    assert ba == BasicAuthConfig(username="u", password_file=str(pw))


def test_ingest_budget_must_hold_one_request() -> None:
    """The ingest byte budget must be at least one decompressed request."""
    data = with_exporter(
        prw={"receiver": {"max_decompressed_bytes": "64MiB", "ingest_max_bytes": "32MiB"}}
    )
    assert problems_of(data) == [
        "prw.receiver: ingest_max_bytes is smaller than max_decompressed_bytes"
    ]


def test_equal_limits_pass_the_cross_checks() -> None:
    """Equal values are fine where one must not exceed the other."""
    data = {
        "prw": {
            "receiver": {
                "max_request_bytes": 100,
                "max_decompressed_bytes": 100,
                "ingest_max_bytes": 100,
            },
            "exporters": [
                {
                    "url": URL,
                    "retry": {"initial_delay_s": 2, "max_delay_s": 2},
                    "breaker": {"open_s": 3, "max_open_s": 3},
                }
            ],
        }
    }
    cfg = config_from_dict(data)
    assert cfg.prw.receiver.max_decompressed_bytes == 100


def test_same_url_twice_needs_names() -> None:
    """Two exporters for one URL are allowed once they have distinct names."""
    assert problems_of({"prw": {"exporters": [{"url": URL}, {"url": URL}]}}) == [
        "prw.exporters: two exporters are named '127.0.0.1:9090/api/v1/write';"
        " give them distinct names"
    ]
    cfg = config_from_dict(
        {"prw": {"exporters": [{"url": URL, "name": "a"}, {"url": URL, "name": "b"}]}}
    )
    assert [exporter_name(e) for e in cfg.prw.exporters] == ["a", "b"]


# ---- every problem at once --------------------------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    """Unknown keys, wrong types, bad choices and failed validators anywhere in the tree are all
    reported together, even when they sit next to each other in one section."""
    data = {
        "bogus": 1,
        "shutdown_grace_s": 0,
        "log": {"level": "loud", "rate_limit_interval_s": -1},
        "telemetry": {"listen": "nowhere"},
        "prw": {
            "batch": {"max_series": "many", "interval_s": 0, "max_bytes": "12 parsecs"},
            "queue": {"full_behavior": "explode", "max_batches": 0},
            "exporters": [
                {"url": URL, "timeot_s": 1, "workers": 0},
                {"url": "ftp://x", "retry": {"jitter": 2, "multiplier": "x"}},
            ],
        },
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    expected = [
        "bogus: unknown key",
        "log.level: 'loud' is not one of debug, info, warning, error",
        "log.rate_limit_interval_s: must be > 0",
        "telemetry.listen: 'nowhere' is not host:port",
        "prw.batch.max_series: expected an integer, got 'many'",
        "prw.batch.max_bytes: '12 parsecs' is not a size like 64MiB",
        "prw.batch.interval_s: must be > 0",
        "prw.queue.full_behavior: 'explode' is not one of block, drop_oldest, drop_newest",
        "prw.queue.max_batches: must be > 0",
        "prw.exporters[0].timeot_s: unknown key",
        "prw.exporters[0].workers: must be > 0",
        "prw.exporters[1].retry.multiplier: expected a number, got 'x'",
        "prw.exporters[1].retry.jitter: must be between 0 and 1",
        "prw.exporters[1].url: 'ftp://x' is not an http:// or https:// URL",
        "shutdown_grace_s: must be > 0",
    ]
    assert info.value.problems == expected
    assert str(info.value) == "invalid configuration:\n  " + "\n  ".join(expected)


# ---- YAML -------------------------------------------------------------------------------------


def test_load_yaml_reads_a_mapping() -> None:
    """YAML text becomes plain data that config_from_dict accepts."""
    text = "prw:\n  exporters:\n    - url: http://h/api/v1/write\n  queue:\n    max_bytes: 64MiB\n"
    data = load_yaml(text)
    assert data == {
        "prw": {"exporters": [{"url": "http://h/api/v1/write"}], "queue": {"max_bytes": "64MiB"}}
    }
    assert config_from_dict(data).prw.queue.max_bytes == 64 * MiB


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_load_yaml_empty_is_an_empty_mapping(text: str) -> None:
    """An empty document is an empty config, not an error."""
    assert load_yaml(text) == {}


def test_load_yaml_syntax_error_is_one_line() -> None:
    """A YAML syntax error is one ConfigError problem on one line, with the position."""
    with pytest.raises(ConfigError) as info:
        load_yaml("prw:\n  exporters: [1\n")
    (problem,) = info.value.problems
    assert problem.startswith("<yaml>: ")
    assert "\n" not in problem
    assert "line 2" in problem


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("just text\n", "str")]
)
def test_load_yaml_non_mapping(text: str, kind: str) -> None:
    """A document that is not a mapping is rejected, naming what it is."""
    with pytest.raises(ConfigError) as info:
        load_yaml(text)
    assert info.value.problems == [f"<top>: expected a mapping, got {kind}"]


def test_load_yaml_is_safe() -> None:
    """Python object tags are refused instead of being constructed."""
    with pytest.raises(ConfigError) as info:
        load_yaml("a: !!python/object/apply:os.system ['true']\n")
    assert info.value.problems[0].startswith("<yaml>: ")


# ---- helpers ----------------------------------------------------------------------------------


def test_set_path_creates_levels() -> None:
    """set_path sets a dotted key, creating missing levels and keeping siblings."""
    data: dict[str, Any] = {"prw": {"batch": {"max_series": 5}}}
    set_path(data, "prw.batch.interval_s", 2.0)
    set_path(data, "prw.queue.max_bytes", "1MiB")
    set_path(data, "shutdown_grace_s", 3.0)
    assert data == {
        "prw": {"batch": {"max_series": 5, "interval_s": 2.0}, "queue": {"max_bytes": "1MiB"}},
        "shutdown_grace_s": 3.0,
    }


def test_to_dict_round_trips() -> None:
    """to_dict gives plain data in the YAML shape, which builds the same config again."""
    cfg = config_from_dict(
        {
            "prw": {
                "exporters": [
                    {"url": URL, "basic_auth": {"username": "u", "password": "p"}},
                    {"url": "http://other/api", "headers": {"a": "b"}},
                ]
            }
        }
    )
    data = to_dict(cfg)
    assert data["prw"]["exporters"][0]["basic_auth"] == {
        "username": "u",
        "password": "p",
        "password_file": "",
    }
    assert data["prw"]["exporters"][1]["basic_auth"] is None
    assert config_from_dict(data) == cfg


def test_redact_hides_secrets() -> None:
    """Passwords, bearer tokens, credentials in URLs and header values are replaced; empty
    secrets, file paths and everything else are left as they are."""
    data = {
        "url": "https://user:hunter2@host:9090/api/v1/write",
        "bearer_token": "s3cret",
        "bearer_token_file": "/run/token",
        "basic_auth": {"username": "user", "password": "hunter2", "password_file": ""},
        "other": [{"password": "p"}, {"password": ""}, "http://plain/api", 5, None],
        "listen": ":9091",
        "headers": {"Authorization": "Bearer abc", "X-Scope-OrgID": "tenant"},
    }
    assert redact(data) == {
        "url": "https://<redacted>@host:9090/api/v1/write",
        "bearer_token": "<redacted>",
        "bearer_token_file": "/run/token",
        "basic_auth": {"username": "user", "password": "<redacted>", "password_file": ""},
        "other": [{"password": "<redacted>"}, {"password": ""}, "http://plain/api", 5, None],
        "listen": ":9091",
        "headers": {"Authorization": "<redacted>", "X-Scope-OrgID": "<redacted>"},
    }
    assert data["bearer_token"] == "s3cret"  # the input is not changed


def test_redact_a_whole_config() -> None:
    """Redacting a loaded config leaves no secret anywhere in it."""
    cfg = config_from_dict(
        {
            "prw": {
                "exporters": [
                    {"url": "http://u:urlpass@a/api", "bearer_token": "tok"},
                    {"url": "http://b/api", "basic_auth": {"username": "u", "password": "pw"}},
                ]
            }
        }
    )
    text = repr(redact(to_dict(cfg)))
    for secret in ("urlpass", "tok'", "'pw'"):
        assert secret not in text
    assert text.count("<redacted>") == 3


@pytest.mark.parametrize(
    ("url", "name", "expected"),
    [
        ("http://127.0.0.1:9090/api/v1/write", "", "127.0.0.1:9090/api/v1/write"),
        ("https://user:pw@host/api/v1/push?tenant=a", "", "host/api/v1/push"),
        ("http://host:8428", "", "host:8428"),
        ("http://host:8428?x=1", "", "host:8428"),
        ("http://host/api", "mine", "mine"),
    ],
)
def test_exporter_name(url: str, name: str, expected: str) -> None:
    """The exporter's label is its name, or its URL without scheme, credentials and query."""
    assert exporter_name(PRWExporterConfig(url=url, name=name)) == expected


def test_disk_queue_dir_must_be_a_directory(tmp_path: Path) -> None:
    """In disk mode, a queue dir that exists as a file is refused at load; a missing one that can
    be created is fine (the queue creates it)."""
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    data = with_exporter(prw={"queue": {"mode": "disk", "dir": str(a_file)}})
    assert problems_of(data) == [f"prw.queue.dir: {a_file} exists and is not a directory"]
    ok = with_exporter(prw={"queue": {"mode": "disk", "dir": str(tmp_path / "new" / "q")}})
    assert config_from_dict(ok).prw.queue.mode == "disk"


def test_hybrid_queue_refuses_durable_ack() -> None:
    """durable_ack needs every batch on disk; the hybrid queue keeps some in memory, so the two
    together are refused with a pointer to disk mode."""
    data = with_exporter(prw={"queue": {"mode": "hybrid", "durable_ack": True, "dir": "/tmp/q"}})
    assert problems_of(data) == [
        "prw.queue.durable_ack: the hybrid queue's memory part is never fsynced; "
        "use mode: disk for durable_ack"
    ]
