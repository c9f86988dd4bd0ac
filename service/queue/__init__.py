"""Queues between the batcher and the export workers: the interface and its implementations."""

from service.queue.base import Queue, QueueStats
from service.queue.memory import MemoryQueue

__all__ = ["MemoryQueue", "Queue", "QueueStats"]
