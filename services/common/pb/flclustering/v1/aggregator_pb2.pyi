from services.common.pb.flclustering.v1 import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateHeader(_message.Message):
    __slots__ = ("model", "cluster")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    model: _tensors_pb2.ModelHeader
    cluster: int
    def __init__(self, model: _Optional[_Union[_tensors_pb2.ModelHeader, _Mapping]] = ..., cluster: _Optional[int] = ...) -> None: ...

class ForwardUpdateRequest(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    trailer: _tensors_pb2.ModelTrailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[_tensors_pb2.ModelTrailer, _Mapping]] = ...) -> None: ...

class ForwardUpdateResponse(_message.Message):
    __slots__ = ("accepted", "round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ...) -> None: ...

class AggregateRequest(_message.Message):
    __slots__ = ("round", "cluster_accuracy", "abandon", "privacy", "flush", "clusters")
    class ClusterAccuracyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ABANDON_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    cluster_accuracy: _containers.ScalarMap[int, float]
    abandon: bool
    privacy: CentralPrivacy
    flush: _containers.RepeatedScalarFieldContainer[int]
    clusters: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., cluster_accuracy: _Optional[_Mapping[int, float]] = ..., abandon: _Optional[bool] = ..., privacy: _Optional[_Union[CentralPrivacy, _Mapping]] = ..., flush: _Optional[_Iterable[int]] = ..., clusters: _Optional[_Iterable[int]] = ...) -> None: ...

class CentralPrivacy(_message.Message):
    __slots__ = ("noise_multiplier", "expected")
    class ExpectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    noise_multiplier: float
    expected: _containers.ScalarMap[int, float]
    def __init__(self, noise_multiplier: _Optional[float] = ..., expected: _Optional[_Mapping[int, float]] = ...) -> None: ...

class PrivacyReport(_message.Message):
    __slots__ = ("clip", "next_clip", "sigma", "sensitivity", "clipped")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    NEXT_CLIP_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_FIELD_NUMBER: _ClassVar[int]
    clip: float
    next_clip: float
    sigma: float
    sensitivity: float
    clipped: int
    def __init__(self, clip: _Optional[float] = ..., next_clip: _Optional[float] = ..., sigma: _Optional[float] = ..., sensitivity: _Optional[float] = ..., clipped: _Optional[int] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("participant_id", "reason")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    reason: str
    def __init__(self, participant_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AggregateResponse(_message.Message):
    __slots__ = ("model_version", "rejected", "cluster_weights", "rejected_clusters", "fallbacks", "updates", "round", "abandoned", "refused", "privacy", "merged", "staleness_mean", "staleness_max", "stale")
    class ClusterWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MEAN_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MAX_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    rejected: _containers.RepeatedCompositeFieldContainer[Rejection]
    cluster_weights: _containers.ScalarMap[int, float]
    rejected_clusters: _containers.RepeatedScalarFieldContainer[str]
    fallbacks: _containers.RepeatedScalarFieldContainer[str]
    updates: int
    round: int
    abandoned: bool
    refused: str
    privacy: PrivacyReport
    merged: _containers.RepeatedScalarFieldContainer[str]
    staleness_mean: float
    staleness_max: int
    stale: int
    def __init__(self, model_version: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., cluster_weights: _Optional[_Mapping[int, float]] = ..., rejected_clusters: _Optional[_Iterable[str]] = ..., fallbacks: _Optional[_Iterable[str]] = ..., updates: _Optional[int] = ..., round: _Optional[int] = ..., abandoned: _Optional[bool] = ..., refused: _Optional[str] = ..., privacy: _Optional[_Union[PrivacyReport, _Mapping]] = ..., merged: _Optional[_Iterable[str]] = ..., staleness_mean: _Optional[float] = ..., staleness_max: _Optional[int] = ..., stale: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_version", "cluster")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    cluster: int
    def __init__(self, model_version: _Optional[int] = ..., cluster: _Optional[int] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: _tensors_pb2.ModelHeader
    data: bytes
    trailer: _tensors_pb2.ModelTrailer
    def __init__(self, header: _Optional[_Union[_tensors_pb2.ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[_tensors_pb2.ModelTrailer, _Mapping]] = ...) -> None: ...

class GetAggregatorStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DefencePolicy(_message.Message):
    __slots__ = ("strategy", "q", "byzantine_fraction", "norm_factor", "cluster_factor", "twin_factor", "personalise", "secure", "guard", "mode", "max_staleness")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    BYZANTINE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NORM_FACTOR_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FACTOR_FIELD_NUMBER: _ClassVar[int]
    TWIN_FACTOR_FIELD_NUMBER: _ClassVar[int]
    PERSONALISE_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    q: float
    byzantine_fraction: float
    norm_factor: float
    cluster_factor: float
    twin_factor: float
    personalise: bool
    secure: str
    guard: bool
    mode: str
    max_staleness: int
    def __init__(self, strategy: _Optional[str] = ..., q: _Optional[float] = ..., byzantine_fraction: _Optional[float] = ..., norm_factor: _Optional[float] = ..., cluster_factor: _Optional[float] = ..., twin_factor: _Optional[float] = ..., personalise: _Optional[bool] = ..., secure: _Optional[str] = ..., guard: _Optional[bool] = ..., mode: _Optional[str] = ..., max_staleness: _Optional[int] = ...) -> None: ...

class GetAggregatorStatusResponse(_message.Message):
    __slots__ = ("model_version", "open_round", "pending_updates", "pending_participants", "policy", "version", "revision")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    PENDING_UPDATES_FIELD_NUMBER: _ClassVar[int]
    PENDING_PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    open_round: int
    pending_updates: int
    pending_participants: _containers.RepeatedScalarFieldContainer[str]
    policy: DefencePolicy
    version: str
    revision: str
    def __init__(self, model_version: _Optional[int] = ..., open_round: _Optional[int] = ..., pending_updates: _Optional[int] = ..., pending_participants: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[DefencePolicy, _Mapping]] = ..., version: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("round", "to_version", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    to_version: int
    reason: str
    def __init__(self, round: _Optional[int] = ..., to_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("model_version", "round", "refused_version")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REFUSED_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    round: int
    refused_version: int
    def __init__(self, model_version: _Optional[int] = ..., round: _Optional[int] = ..., refused_version: _Optional[int] = ...) -> None: ...
