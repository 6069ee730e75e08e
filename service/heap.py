"""The cyclic garbage collector in the service's long-lived processes.

A worker holds a few hundred thousand objects from its start (torch, transformers, the
models and their captured graphs) that live as long as it does, and Python's collector
walks all of them on every full collection: under load (bench.service, 8 clients) a worker
ran one every few seconds at about 170 ms each, every job in flight stalled behind it, and
the API process (94 thousand objects) one at about 60 ms. ``settle`` collects once and then
freezes what survived (``gc.freeze``: the collector no longer walks it; CPython documents
it for a server's heap before a fork, the same idea of objects that live on); the full
collections that follow walk only what came after.

A frozen object that later becomes garbage in a reference cycle (a model's captured graph,
when the model leaves the cache) is never collected while frozen, so ``settle`` first
unfreezes: called again whenever the set of long-lived objects changes (a model loaded, one
evicted), its collection frees what left and it freezes the rest again. Between settles, a
captured graph that a model's cache of graphs drops (``DLBacktrace._forget``: a new static
length, a specialised graph) unfreezes the heap, walked whole again until the next settle."""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect everything collectable now, then freeze the survivors."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
