"""What travels in a channel's stream: positions and publications.

Plain values, shared by the hub, the brokers, the codecs and the transports,
and depending on none of them: a broker stamps a :class:`Publication` with
its :class:`Position`, the hub fans it out, a transport encodes it once per
wire format (:class:`EncodedOnce`) and tells its client the position it
carries. Kept apart from the hub so that brokers need not import the hub
that drives them (the two would otherwise import each other).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import msgspec

from .fossil import create_delta
from .utf8 import check_utf8

__all__ = [
    "DEFAULT_HISTORY",
    "EMPTY",
    "ClientInfo",
    "EncodedOnce",
    "HistoryPolicy",
    "Position",
    "PresenceEvent",
    "Publication",
    "directed",
    "follows",
    "reaches",
]


class Position(msgspec.Struct, frozen=True):
    """A point in a channel's stream. ``epoch`` changes when history is reset."""

    epoch: str
    offset: int


#: The position of a channel that never had a publication (or whose stream was
#: forgotten). A client at this position has missed nothing that history
#: starting at offset 1 does not hold, whatever that history's epoch.
EMPTY = Position("", 0)


class HistoryPolicy(NamedTuple):
    """How much history one publication's channel keeps: sent with every publish.

    The hub looks it up per channel (the namespace's policy) and hands it to
    the broker with the publication, as Centrifugo's ``PublishOptions`` carry
    ``HistorySize`` and ``HistoryTTL``: brokers store and stamp, and know no
    namespaces. ``size`` 0 keeps no history (the offset still advances).
    """

    #: Publications kept, newest last.
    size: int
    #: Seconds history is kept after the channel's last publication.
    ttl: float


#: What a hub built without ``history_for`` keeps: the ``[history]`` defaults.
DEFAULT_HISTORY = HistoryPolicy(size=100, ttl=300.0)


def follows(position: Position, pub: Publication) -> bool:
    """Whether ``pub`` is the very next publication after ``position``."""
    return pub.offset == position.offset + 1 and (pub.epoch == position.epoch or position == EMPTY)


class ClientInfo(msgspec.Struct, omit_defaults=True):
    """Who published or who is present: Centrifugo's ``ClientInfo``."""

    user: str = ""
    client: str = ""
    conn_info: msgspec.Raw | None = None
    chan_info: msgspec.Raw | None = None


class EncodedOnce:
    """Something every subscriber receives in the same bytes, per wire format."""

    __slots__ = ("_encoded",)

    def __init__(self) -> None:
        self._encoded: dict[Callable[[Any], bytes], bytes] | None = None

    def encoded(self, encoder: Callable[[Any], bytes]) -> bytes:
        """This object in one wire format, built once and shared.

        The first subscriber of a format pays for the encoding; every other
        subscriber of that format gets the same ``bytes`` object.
        """
        cache = self._encoded
        if cache is None:
            cache = self._encoded = {}
        try:
            return cache[encoder]
        except KeyError:
            value = cache[encoder] = encoder(self)
            return value


class Publication(EncodedOnce):
    """One event in one channel, immutable once the broker has stamped it."""

    __slots__ = ("_delta_forms", "channel", "data", "epoch", "info", "offset", "tags", "time")

    #: Whether ``data`` is a Fossil delta against the channel's previous
    #: publication's data (only in the form a delta subscriber receives).
    delta = False
    #: Whether this is the form a delta subscriber receives: its JSON wire
    #: carries ``data`` as a JSON string (the bytes the SDK applies deltas to).
    delta_form = False
    #: Whether ``exclude`` or ``transient`` may differ from the defaults below:
    #: the one test the hub's fan-out makes per publication for publish
    #: options, so that a plain publication pays nothing more (see
    #: :func:`directed`, which builds the ones that do).
    directed = False
    #: Client ids that must not receive it (the publish option ``exclude``).
    exclude: frozenset[str] = frozenset()
    #: Delivered live and not stored (the publish option ``skip_history``). It
    #: carries the position of the channel when it was published and does not
    #: advance it: see :class:`~tidings.hub.Hub` for why.
    transient = False

    def __init__(
        self,
        channel: str,
        offset: int,
        epoch: str,
        data: bytes,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        time_ms: int | None = None,
    ) -> None:
        self.channel = channel
        self.offset = offset
        self.epoch = epoch
        self.data = data
        self.info = info
        self.tags = tags
        self.time = int(time.time() * 1000) if time_ms is None else time_ms
        # [full form, delta form | None | _UNTRIED], built on the first delta subscriber.
        self._delta_forms: list[Any] | None = None
        super().__init__()

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.offset)

    def __repr__(self) -> str:
        return f"<Publication {self.channel}@{self.epoch}:{self.offset}>"

    def for_delta_subscriber(self, previous: Publication | None) -> Publication:
        """This publication as a ``delta: "fossil"`` subscriber receives it.

        ``previous`` is the publication of the channel that subscriber
        received last. When it is the one right before this (same epoch,
        offset one less), the subscriber gets the Fossil delta against its
        data; otherwise (the first publication after a subscribe, a gap) the
        full data. The delta is a function of this publication alone (the
        data at the offset before it is unique), so it is computed once, by
        the first delta subscriber, and every other shares the same form
        object and thus its encoded bytes (``EncodedOnce``). A delta no
        smaller than the data, or that is not UTF-8 (JSON carries it in a
        string), is not used: the full form goes instead.
        """
        forms = self._delta_forms
        if forms is None:
            forms = self._delta_forms = [_DeltaForm(self, self.data), _UNTRIED]
        if (
            previous is None
            or previous.offset + 1 != self.offset
            or previous.epoch != self.epoch
            or previous.transient
            or self.transient
        ):
            # A transient publication shares its offset with the stored one
            # before it: no delta is made against it, nor of it, so the data
            # a delta applies to is always the stored publication's.
            return forms[0]  # type: ignore[no-any-return]
        delta = forms[1]
        if delta is _UNTRIED:
            patch = create_delta(previous.data, self.data)
            delta = forms[1] = (
                _DeltaPatch(self, patch)
                if len(patch) < len(self.data) and _is_utf8(patch)
                else None
            )
        return delta or forms[0]  # type: ignore[no-any-return]


class _Directed(Publication):
    """A publication with publish options: its own ``exclude`` and ``transient``."""

    __slots__ = ("exclude", "transient")

    directed = True


def directed(
    channel: str,
    offset: int,
    epoch: str,
    data: bytes,
    info: ClientInfo | None = None,
    tags: dict[str, str] | None = None,
    time_ms: int | None = None,
    *,
    exclude: frozenset[str] = frozenset(),
    transient: bool = False,
) -> Publication:
    """A :class:`Publication` with the publish options ``exclude`` and ``transient``.

    Without either it is a plain publication: the two slots are paid only by
    publications that use them (16 bytes each, and one in history per stored
    one), and the fan-out tests one class attribute (``directed``).
    """
    if not exclude and not transient:
        return Publication(channel, offset, epoch, data, info, tags, time_ms)
    pub = _Directed(channel, offset, epoch, data, info, tags, time_ms)
    pub.exclude = exclude
    pub.transient = transient
    return pub


#: A delta form not computed yet (None: computed, and not worth sending).
_UNTRIED = object()


def _is_utf8(data: bytes) -> bool:
    """A delta copies byte ranges, so its literal parts may split a UTF-8 character."""
    try:
        check_utf8(data)
    except UnicodeDecodeError:
        return False
    return True


class _DeltaForm(Publication):
    """A publication as delta subscribers receive it: the full data or a delta.

    The same position, info, tags and time; its own ``EncodedOnce`` cache, so
    each form is encoded once per wire format like any publication. Class
    attributes carry the flags: a plain publication pays no memory for them.
    """

    __slots__ = ()

    delta_form = True

    def __init__(self, pub: Publication, data: bytes) -> None:
        super().__init__(pub.channel, pub.offset, pub.epoch, data, pub.info, pub.tags, pub.time)


class _DeltaPatch(_DeltaForm):
    """The delta form whose data is a Fossil delta."""

    __slots__ = ()

    delta = True


class PresenceEvent(EncodedOnce):
    """A client joined or left a channel whose namespace announces it."""

    __slots__ = ("channel", "info", "kind")

    def __init__(self, channel: str, kind: Literal["join", "leave"], info: ClientInfo) -> None:
        super().__init__()
        self.channel = channel
        self.kind = kind
        self.info = info


def reaches(since: Position, publications: list[Publication], top: Position) -> bool:
    """Whether ``publications`` hold every publication after ``since`` up to ``top``."""
    if (since.epoch != top.epoch and since != EMPTY) or since.offset > top.offset:
        return False
    if since.offset == top.offset:
        return True
    return (
        bool(publications)
        and publications[0].offset == since.offset + 1
        and publications[-1].offset == top.offset
        and len(publications) == top.offset - since.offset
    )
