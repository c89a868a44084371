"""Reading /metrics in tests: prometheus_client's own parser, so an assertion names a sample and its labels
rather than a spelling (label order, "20" or "20.0")."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[str, dict[frozenset, float]]:
    """Every sample of a Prometheus text exposition: {sample name: {frozenset of (label, value): value}}.
    Raises ValueError on text that does not parse."""
    out: dict[str, dict[frozenset, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value (None when the exposition has no such sample)."""
    return samples(text).get(name, {}).get(frozenset(labels.items()))


def types(text: str) -> dict[str, str]:
    """{exposed metric name: its TYPE}, as the "# TYPE" lines say (counters with their `_total`)."""
    return {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}


def nonzero(metrics, name: str) -> dict[frozenset, float]:
    """The samples of `name` that are not 0 in a service.observability.Metrics' exposition."""
    return {k: v for k, v in samples(metrics.exposition().decode()).get(name, {}).items() if v}
