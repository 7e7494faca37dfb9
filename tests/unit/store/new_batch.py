"""A new batch for a test, stored the way the server stores one."""

from __future__ import annotations

from jobworker.model import BatchOptions, JobSpec
from jobworker.store.batches import BatchRecord, BatchStore


def new_batch(
    store: BatchStore, owner: str, options: BatchOptions, specs: tuple[JobSpec, ...]
) -> BatchRecord:
    """Persist a new batch and make it known, as BatchService does (without its thread);
    ResourceExhausted when the disk is full. Its job folders are left to the jobs' starts."""
    batch = store.persist(owner, options, specs)
    store.register(batch)
    return batch
