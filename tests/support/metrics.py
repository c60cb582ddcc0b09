"""Shared by several test modules: a scrape of /metrics and its samples."""

from __future__ import annotations

import http.client

from prometheus_client.parser import text_string_to_metric_families

from support.daemon import WAIT


def scrape(address: tuple[str, int], path: str = "/metrics") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(*address, timeout=WAIT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(name, sorted labels): value} as prometheus_client's parser reads them."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]
