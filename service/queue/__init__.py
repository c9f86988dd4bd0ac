"""Queues between the batcher and the export workers: the interface and its implementations."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from service.config import QueueConfig
from service.queue.base import Queue, QueueStats
from service.queue.disk import DiskQueue, DiskQueueSettings, QueueLockedError
from service.queue.hybrid import HybridQueue
from service.queue.memory import MemoryQueue

__all__ = [
    "DiskQueue",
    "HybridQueue",
    "MemoryQueue",
    "Queue",
    "QueueLockedError",
    "QueueStats",
    "open_queue",
    "queue_dir_name",
]


def queue_dir_name(exporter: str, url: str) -> str:
    """A stable, filesystem-safe directory name for an exporter's disk queue: its name made safe,
    plus a hash of its URL so two exporters never share a directory."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", exporter).strip("._")[:60] or "exporter"
    return f"{safe}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def open_queue(cfg: QueueConfig, dir_name: str) -> MemoryQueue | DiskQueue | HybridQueue:
    """The queue `cfg` describes; a disk (or hybrid) queue lives in `cfg.dir/dir_name`, recovered
    on open. Raises QueueLockedError if another process holds that directory."""
    if cfg.mode == "memory":
        return MemoryQueue(cfg)
    disk = DiskQueue(
        DiskQueueSettings(
            directory=Path(cfg.dir) / dir_name,
            max_bytes=cfg.max_bytes,
            segment_bytes=cfg.segment_bytes,
            full_behavior=cfg.full_behavior,
            durable_ack=cfg.durable_ack,
            sync_interval_s=cfg.sync_interval_s,
        )
    )
    if cfg.mode == "disk":
        return disk
    spill_bytes = int(cfg.max_memory_bytes * cfg.spill_at)
    # The memory part's own limits are never reached: the hybrid routes to disk first.
    memory = MemoryQueue(
        QueueConfig(max_batches=2**62, max_bytes=cfg.max_memory_bytes, full_behavior="block")
    )
    return HybridQueue(memory, disk, spill_bytes)
