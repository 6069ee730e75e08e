"""Layer names in ``output.relevance`` against the node names of a model's captured graph.

Two places check them with the same words: the API at the door (``service.api.door``, from
the names a worker published, ``store.GRAPH``) and the worker when it runs the job on the
graph it has just captured (``service.work.classify``), which is the only check a model's
first job gets. No torch here: the API process never imports it."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence

from .schemas import listed

FIELD = ("output", "relevance")


class UnknownNodes(ValueError):
    """Names that are not nodes of the model's graph. ``loc`` is the request field and
    ``msg`` says what is wrong without it (the API's 422 puts the field in front itself);
    ``str()`` is the whole reason, field first, as a failed job reports it."""

    loc = FIELD

    def __init__(self, model_id: str, unknown: Sequence[str], nodes: Collection[str]):
        close = difflib.get_close_matches(unknown[0], sorted(nodes), n=3)
        hint = f"; closest: {', '.join(close)}" if close else ""
        are = "is not a node" if len(unknown) == 1 else "are not nodes"
        self.msg = (
            f"{_listed(unknown)} {are} of {model_id}'s graph ({len(nodes)} nodes"
            f"{hint}); ask for 'all' to get every node's relevance under its name, or 'inputs'"
        )
        super().__init__(f"{'.'.join(FIELD)}: {self.msg}")


# How many unknown names a message lists, and how much of each: a request of thousands of
# long names was answered with all of them (12 MB for a 6 MB body).
LISTED, SHOWN = 5, 60


def _listed(names: Sequence[str]) -> str:
    """The first ``LISTED`` names, each cut to ``SHOWN`` characters, and how many more."""
    return listed(names, LISTED, _cut)


def _cut(name: str) -> str:
    return repr(name) if len(name) <= SHOWN else f"{name[:SHOWN]!r}... ({len(name)} characters)"


def check(model_id: str, names: str | Sequence[str], nodes: Collection[str]) -> None:
    """Raise ``UnknownNodes`` when ``names`` (a list of layer names; "all" and "inputs" need
    no graph) holds a name that is not in ``nodes``."""
    if isinstance(names, str):
        return
    unknown = [n for n in names if n not in nodes]
    if unknown:
        raise UnknownNodes(model_id, unknown, nodes)
