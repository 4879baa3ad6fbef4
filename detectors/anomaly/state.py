"""What a detector remembers, as plain typed data: the schema of the saved anomaly state.

The controller keeps what its anomaly watches learned across a restart
(``controller/anomaly_state.py``). That state used to be a pickle, and a
pickle runs code when it is read; now every stateful class here has
``to_state()``, which returns one of the frozen msgspec Structs below (numbers,
strings and lists only), and ``load_state(state)``, which copies such a
Struct into a detector freshly built from the watch's own spec. So the file
never chooses which classes are built or with which parameters: the spec
does, and the file only supplies the numbers, which ``load_state`` checks
against the built detector's shape (the right kind, list lengths within its
bounds, indexes in range) before taking any of them. A mismatch is a
``ValueError``.

Pure: no I/O. ``encode``/``decode`` of whole files live in ``watch.py``.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Protocol, TypeVar, runtime_checkable

import msgspec

EvidenceState = dict[str, float | str]


class DetectorState(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True, tag_field="type"):
    """Base of every detector's state; the ``type`` tag names the class that wrote it."""


class OrderedInputState(DetectorState, frozen=True):
    inner: AnyDetectorState
    last_ts: float
    dropped: int


class TailCalibratedState(DetectorState, frozen=True):
    inner: AnyDetectorState
    history: RollingWindowState
    raw: float


class WarmUpState(DetectorState, frozen=True):
    inner: AnyDetectorState
    first_ts: float | None


class PeakGateState(DetectorState, frozen=True):
    inner: AnyDetectorState
    peaks: list[tuple[float, float]]


class EwmaZState(DetectorState, frozen=True):
    last_ts: float
    mean: float
    var: float
    samples: int
    z: float


class RunningExtremesState(DetectorState, frozen=True):
    high: float
    low: float


class DecayingExtremesState(DetectorState, frozen=True):
    first_ts: float
    last_ts: float
    centre: float
    high: float
    low: float
    excess: float


class ExhaustionForecastState(DetectorState, frozen=True):
    samples: list[tuple[float, float]]
    evidence: EvidenceState


class MaxFusionState(DetectorState, frozen=True):
    parts: list[AnyDetectorState]
    leader: int


class NullState(DetectorState, frozen=True):
    pass


class RandomState(DetectorState, frozen=True):
    words: list[int]
    """``random.Random.getstate()[1]``: the Mersenne Twister's 624 words and its position."""
    gauss_next: float | None


class RobustZState(DetectorState, frozen=True):
    window: RollingWindowState
    recent: list[tuple[float, float]]
    previous: float
    evidence: EvidenceState


class SeasonalResidualState(DetectorState, frozen=True):
    inner: AnyDetectorState
    means: list[float]
    written: list[int]
    slot: int | None
    slot_sum: float
    slot_count: int
    expected: float


class RollingMeanState(DetectorState, frozen=True):
    inner: AnyDetectorState
    index: list[int]
    sums: list[float]
    counts: list[float]
    first_ts: float


class ResampledState(DetectorState, frozen=True):
    inner: AnyDetectorState
    index: int | None
    sum: float
    count: int
    score: float


class RollingWindowState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    times: list[float]
    values: list[float]


class PolicyState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    recent: list[bool]
    last_hit: float
    up: bool
    peak: float


class HostVectorsState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A host's kept vectors (the next fit's training set). The forest itself is not saved: it is refitted
    from these vectors, so no model object ever goes through a file."""

    history: list[list[float]]
    last_ts: float


class HostState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One (host model, node) of the multivariate watch."""

    model: str
    node: str
    vectors: HostVectorsState
    index: int | None
    sums: list[float]
    count: int
    last_ts: float
    typical: list[float]
    policy: PolicyState
    raised: bool
    admitted: bool
    last: tuple[float, list[float], float] | None
    window: list[tuple[float, float]]


STATE_TYPES = (OrderedInputState, TailCalibratedState, WarmUpState, PeakGateState, EwmaZState,
               RunningExtremesState, DecayingExtremesState, ExhaustionForecastState, MaxFusionState, NullState,
               RandomState, RobustZState, SeasonalResidualState, RollingMeanState, ResampledState)
AnyDetectorState = (OrderedInputState | TailCalibratedState | WarmUpState | PeakGateState | EwmaZState
                    | RunningExtremesState | DecayingExtremesState | ExhaustionForecastState | MaxFusionState
                    | NullState | RandomState | RobustZState | SeasonalResidualState | RollingMeanState
                    | ResampledState)


@runtime_checkable
class PersistentDetector(Protocol):
    """A detector whose state can be saved and loaded (every detector class of this package)."""

    def to_state(self) -> DetectorState: ...

    def load_state(self, state: DetectorState) -> None: ...


S = TypeVar("S", bound=msgspec.Struct)


def expect(state: object, kind: type[S]) -> S:
    """``state`` as a ``kind``; ``ValueError`` when the file holds another kind there."""
    if not isinstance(state, kind):
        raise ValueError(f"expected {kind.__name__}, found {type(state).__name__}")  # noqa: TRY004 - one error type: unusable state
    return state


def inner_state(inner: object) -> AnyDetectorState:
    """The state of a wrapped detector (a detector from outside this package has none to give)."""
    to_state = getattr(inner, "to_state", None)  # not isinstance(PersistentDetector): that is 20x slower
    state = to_state() if to_state is not None else None
    if not isinstance(state, STATE_TYPES):
        raise TypeError(f"{type(inner).__name__} cannot save its state in the schema")
    return state


def load_inner(inner: object, state: DetectorState) -> None:
    load_state = getattr(inner, "load_state", None)
    if load_state is None:
        raise ValueError(f"{type(inner).__name__} cannot load a state")
    load_state(state)


def check_length(what: str, items: Sized, *, at_most: int | None = None, exactly: int | None = None) -> None:
    """A saved list's length must fit the detector built from the spec."""
    if exactly is not None and len(items) != exactly:
        raise ValueError(f"{what}: {len(items)} entries, expected {exactly}")
    if at_most is not None and len(items) > at_most:
        raise ValueError(f"{what}: {len(items)} entries, at most {at_most} allowed")
