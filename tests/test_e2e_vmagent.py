"""governor between real peers: vmagent remote-writing into it, victoria-metrics behind it.

Time is real here: every wait is a condition polled with a deadline, never a sleep. The flow is
stopped by reloading vmagent (SIGHUP) with no scrape job, then waiting until vmagent's own
metrics say every row it scraped was packed into a block and every block was sent.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.config import exporter_name
from tests.peers import (
    JOB,
    PROMETHEUS_SCRAPE_SERIES,
    InProcessGovernor,
    ScrapeTarget,
    assert_scraped_values,
    expected_scraped_series,
    governor_config,
    start_victoria_metrics,
    start_vmagent,
    vmagent_scrape_config,
    wait_until,
)

pytestmark = pytest.mark.peers

# vmagent 1.79 adds scrape_timeout_seconds to the series Prometheus adds to every scrape.
VMAGENT_SCRAPE_SERIES = (*PROMETHEUS_SCRAPE_SERIES, "scrape_timeout_seconds")
MIN_SCRAPES = 4
FLOW_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 20.0


async def test_vmagent_remote_write_reaches_victoria_metrics_exactly(
    tmp_path: Path, peer_client: httpx.AsyncClient, scrape_target: ScrapeTarget
) -> None:
    """vmagent scrapes 200 series and remote-writes through governor to victoria-metrics.

    Every series arrives with its labels intact (the target's labels plus job and instance, and
    vmagent's own scrape series), every target sample keeps its value, and the counts agree
    exactly: rows vmagent scraped and generated == rows it sent == governor received ==
    governor sent == victoria-metrics inserted == samples stored; no request failed or retried.
    """
    client = peer_client
    async with (
        start_victoria_metrics(client, tmp_path / "vm") as vm,
        trio.open_nursery() as nursery,
    ):
        gov = InProcessGovernor(governor_config(vm.write_url))
        await gov.start(nursery)
        scrape_cfg = vmagent_scrape_config(scrape_target.address, JOB)
        async with start_vmagent(client, tmp_path / "vmagent", scrape_cfg, gov.write_url) as agent:

            async def flowing() -> tuple[bool, Any]:
                sent = (await agent.metrics()).value("vmagent_remotewrite_blocks_sent_total")
                return scrape_target.scrapes >= MIN_SCRAPES and sent > 0, {
                    "scrapes": scrape_target.scrapes,
                    "blocks_sent": sent,
                }

            await wait_until(flowing, what="scrapes and remote writes", timeout_s=FLOW_TIMEOUT_S)
            await agent.reload(vmagent_scrape_config("", JOB))

            async def all_sent() -> tuple[bool, Any]:
                m = await agent.metrics()
                seen = {
                    "reloads": m.value("vm_promscrape_config_reloads_total"),
                    "scrapers": m.value("vm_promscrape_active_scrapers"),
                    "rows_pushed": m.value("vmagent_remotewrite_rows_pushed_after_relabel_total"),
                    "rows_in_blocks": m.value("vmagent_remotewrite_block_size_rows_sum"),
                    "blocks": m.value("vmagent_remotewrite_block_size_rows_count"),
                    "blocks_sent": m.value("vmagent_remotewrite_blocks_sent_total"),
                    "pending_bytes": m.value("vmagent_remotewrite_pending_data_bytes"),
                    "pending_blocks": m.value("vmagent_remotewrite_pending_inmemory_blocks"),
                }
                done = (
                    seen["reloads"] >= 1
                    and seen["scrapers"] == 0
                    and seen["rows_pushed"] == seen["rows_in_blocks"]
                    and seen["blocks"] == seen["blocks_sent"]
                    and seen["pending_bytes"] == 0
                    and seen["pending_blocks"] == 0
                )
                return done, seen

            await wait_until(all_sent, what="vmagent to send all", timeout_s=DRAIN_TIMEOUT_S)
            m = await agent.metrics()
            assert await agent.peer.stop(signal.SIGTERM) == 0, agent.peer.log_tail()

        report = await gov.stop()
        stored = await vm.export()
        vm_metrics = await vm.metrics()

    assert set(stored) == expected_scraped_series(scrape_target, VMAGENT_SCRAPE_SERIES)
    assert_scraped_values(stored, scrape_target)

    scrapes = m.value("vm_promscrape_scraped_samples_count")
    scraped = m.value("vm_promscrape_scraped_samples_sum")
    agent_sent = m.value("vmagent_remotewrite_block_size_rows_sum")
    blocks = m.value("vmagent_remotewrite_blocks_sent_total")
    assert scraped == scrapes * len(scrape_target.series)
    assert agent_sent == scraped + scrapes * len(VMAGENT_SCRAPE_SERIES)
    assert m.value("vmagent_remotewrite_requests_total", status_code="2XX") == blocks
    assert m.values("vmagent_remotewrite_requests_total") == [blocks]
    assert m.value("vmagent_remotewrite_errors_total") == 0
    assert m.value("vmagent_remotewrite_retries_count_total") == 0
    assert m.value("vmagent_remotewrite_packets_dropped_total") == 0

    stored_count = sum(len(samples) for samples in stored.values())
    name = exporter_name(gov.app.cfg.prw.exporters[0])
    received = gov.sample("governor_datapoints_received_total", pipeline="prw")
    gov_sent = gov.sample("governor_datapoints_sent_total", pipeline="prw", exporter=name)
    vm_inserted = vm_metrics.value("vm_rows_inserted_total", type="promremotewrite")
    assert agent_sent == received == gov_sent == vm_inserted == stored_count > 0
    assert report.clean
    assert report.delivered == {name: agent_sent}
    assert report.dropped == {name: {}}
