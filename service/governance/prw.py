"""The rule engine on remote write: shows each TimeSeries of a WriteRequest to the engine and
builds what comes out; encodes emitted windows as a WriteRequest.

Python work per series only for series whose metric name some rule's pattern matches (one dict
lookup for the rest); a request that no rule changed is forwarded as the client sent it.
"""

from __future__ import annotations

import attrs
from google.protobuf.message import DecodeError as _PBDecodeError

from service._proto.prometheus.remote_pb2 import WriteRequest
from service._proto.prometheus.types_pb2 import Label, Sample, TimeSeries
from service.codec.errors import BadProtobuf
from service.governance.engine import RuleEngine
from service.governance.windows import Emitted

NAME = "__name__"
_COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


@attrs.frozen
class Governed:
    """A request after the rules: `data` is None when nothing changed (forward the original)."""

    data: bytes | None
    series: int
    datapoints: int
    samples: int
    histograms: int
    removed: int  # datapoints dropped or sampled away, or absorbed into windows
    in_samples: int  # what the client sent
    in_histograms: int


def series_name(ts: TimeSeries) -> str:
    labels = ts.labels
    if labels and labels[0].name == NAME:  # Prometheus sorts labels: __name__ comes first
        return labels[0].value
    for label in labels:
        if label.name == NAME:
            return label.value
    return ""


def govern(engine: RuleEngine, data: bytes) -> Governed:
    """Parse a serialized WriteRequest (raises BadProtobuf) and run the rules over it."""
    try:
        req = WriteRequest.FromString(data)
    except _PBDecodeError:
        raise BadProtobuf("body is not a valid protobuf WriteRequest") from None
    kept: list[TimeSeries] = []
    changed = False
    samples = histograms = removed = in_samples = in_histograms = 0
    plan_of = engine.plan
    for ts in req.timeseries:
        n_s = len(ts.samples)
        n_h = len(ts.histograms)
        in_samples += n_s
        in_histograms += n_h
        name = series_name(ts)
        plan = plan_of(name)
        if not plan:
            kept.append(ts)
            samples += n_s
            histograms += n_h
            continue

        def labels_of(ts: TimeSeries = ts) -> dict[str, str]:
            return {lb.name: lb.value for lb in ts.labels if lb.name != NAME}

        if n_h:
            kind = "native_histogram"
            points_of = None
        else:
            kind = "counter" if name.endswith(_COUNTER_SUFFIXES) else "gauge"

            def points_of(ts: TimeSeries = ts) -> list[tuple[int, float]]:
                return [(s.timestamp, s.value) for s in ts.samples]

        v = engine.evaluate(name, plan, labels_of, None, kind, n_s + n_h, points_of)
        if v.drop_all or v.absorbed:
            changed = True
            removed += n_s + n_h
            continue
        if v.keep is None and v.labels is None:
            kept.append(ts)
            samples += n_s
            histograms += n_h
            continue
        changed = True
        out = TimeSeries()
        if v.labels is not None:
            out.labels.extend(_labels(v.name or name, v.labels))
        else:
            out.labels.extend(ts.labels)
        if v.keep is None:
            out.samples.extend(ts.samples)
            out.histograms.extend(ts.histograms)
        else:
            keep = v.keep
            out.samples.extend(s for s, k in zip(ts.samples, keep[:n_s]) if k)
            out.histograms.extend(h for h, k in zip(ts.histograms, keep[n_s:]) if k)
            removed += n_s + n_h - sum(keep)
        if not out.samples and not out.histograms:
            continue
        samples += len(out.samples)
        histograms += len(out.histograms)
        kept.append(out)
    if not changed:
        data = None
    else:
        new = WriteRequest()
        new.timeseries.extend(kept)
        new.metadata.extend(req.metadata)
        data = new.SerializeToString()
    return Governed(
        data,
        len(kept),
        samples + histograms,
        samples,
        histograms,
        removed,
        in_samples,
        in_histograms,
    )


def _labels(name: str, labels: dict[str, str]) -> list[Label]:
    """Labels in Prometheus order: sorted by name, __name__ included."""
    pairs = sorted({**labels, NAME: name}.items())
    return [Label(name=k, value=v) for k, v in pairs]


def encode(emitted: list[Emitted]) -> tuple[bytes, int, int]:
    """Emitted windows as a serialized WriteRequest: (data, series, datapoints)."""
    req = WriteRequest()
    points = 0
    for e in emitted:
        ts = req.timeseries.add()
        ts.labels.extend(_labels(e.name, e.labels))
        ts.samples.extend(Sample(value=v, timestamp=t) for t, v in e.points)
        points += len(e.points)
    return req.SerializeToString(), len(emitted), points
