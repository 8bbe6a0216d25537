from services.common.pb.flclustering.v1 import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_WAIT: _ClassVar[TaskKind]
    TASK_KIND_PRETRAIN: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
    TASK_KIND_DONE: _ClassVar[TaskKind]

class EvaluationVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVALUATION_VERDICT_OK: _ClassVar[EvaluationVerdict]
    EVALUATION_VERDICT_REFUSED: _ClassVar[EvaluationVerdict]
    EVALUATION_VERDICT_DIVERGED: _ClassVar[EvaluationVerdict]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_WAIT: TaskKind
TASK_KIND_PRETRAIN: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_KIND_DONE: TaskKind
EVALUATION_VERDICT_OK: EvaluationVerdict
EVALUATION_VERDICT_REFUSED: EvaluationVerdict
EVALUATION_VERDICT_DIVERGED: EvaluationVerdict

class JoinRequest(_message.Message):
    __slots__ = ("participant_id", "num_train", "num_test", "group", "device", "data_schema", "participant_version")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_FIELD_NUMBER: _ClassVar[int]
    NUM_TEST_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DATA_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_VERSION_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    num_train: int
    num_test: int
    group: int
    device: str
    data_schema: str
    participant_version: str
    def __init__(self, participant_id: _Optional[str] = ..., num_train: _Optional[int] = ..., num_test: _Optional[int] = ..., group: _Optional[int] = ..., device: _Optional[str] = ..., data_schema: _Optional[str] = ..., participant_version: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("participant_id", "participants")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    participants: int
    def __init__(self, participant_id: _Optional[str] = ..., participants: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("participant_id", "wait_s")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    wait_s: float
    def __init__(self, participant_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class TrainingSettings(_message.Message):
    __slots__ = ("epochs", "batch_size", "lr", "momentum", "pre_steps", "adjusted", "report_loss", "sketch_dim", "sketch_seed", "compression", "secure")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    PRE_STEPS_FIELD_NUMBER: _ClassVar[int]
    ADJUSTED_FIELD_NUMBER: _ClassVar[int]
    REPORT_LOSS_FIELD_NUMBER: _ClassVar[int]
    SKETCH_DIM_FIELD_NUMBER: _ClassVar[int]
    SKETCH_SEED_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    pre_steps: int
    adjusted: bool
    report_loss: bool
    sketch_dim: int
    sketch_seed: int
    compression: str
    secure: str
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., pre_steps: _Optional[int] = ..., adjusted: _Optional[bool] = ..., report_loss: _Optional[bool] = ..., sketch_dim: _Optional[int] = ..., sketch_seed: _Optional[int] = ..., compression: _Optional[str] = ..., secure: _Optional[str] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("kind", "round", "model_version", "training", "evaluation_id", "next_poll_s", "cluster")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_POLL_S_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    round: int
    model_version: int
    training: TrainingSettings
    evaluation_id: str
    next_poll_s: float
    cluster: int
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., training: _Optional[_Union[TrainingSettings, _Mapping]] = ..., evaluation_id: _Optional[str] = ..., next_poll_s: _Optional[float] = ..., cluster: _Optional[int] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: _tensors_pb2.ModelHeader
    data: bytes
    trailer: _tensors_pb2.ModelTrailer
    def __init__(self, header: _Optional[_Union[_tensors_pb2.ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[_tensors_pb2.ModelTrailer, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("accepted", "round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ...) -> None: ...

class ReportEvaluationRequest(_message.Message):
    __slots__ = ("participant_id", "evaluation_id", "model_version", "accuracy", "loss", "num_examples", "personal_accuracy", "personal_loss", "verdict", "reason")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    evaluation_id: str
    model_version: int
    accuracy: float
    loss: float
    num_examples: int
    personal_accuracy: float
    personal_loss: float
    verdict: EvaluationVerdict
    reason: str
    def __init__(self, participant_id: _Optional[str] = ..., evaluation_id: _Optional[str] = ..., model_version: _Optional[int] = ..., accuracy: _Optional[float] = ..., loss: _Optional[float] = ..., num_examples: _Optional[int] = ..., personal_accuracy: _Optional[float] = ..., personal_loss: _Optional[float] = ..., verdict: _Optional[_Union[EvaluationVerdict, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportEvaluationResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("model_version", "cluster")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    cluster: int
    def __init__(self, model_version: _Optional[int] = ..., cluster: _Optional[int] = ...) -> None: ...

class DownloadModelResponse(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: _tensors_pb2.ModelHeader
    data: bytes
    trailer: _tensors_pb2.ModelTrailer
    def __init__(self, header: _Optional[_Union[_tensors_pb2.ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[_tensors_pb2.ModelTrailer, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("members_offset", "members_limit", "history_offset", "history_limit")
    MEMBERS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    members_offset: int
    members_limit: int
    history_offset: int
    history_limit: int
    def __init__(self, members_offset: _Optional[int] = ..., members_limit: _Optional[int] = ..., history_offset: _Optional[int] = ..., history_limit: _Optional[int] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "mean_accuracy", "mean_loss", "accuracy_std", "worst_accuracy", "duration_s", "rejected", "selected", "received", "timed_out", "model_version", "worst_decile_accuracy", "cluster_weights", "rejected_clusters", "fallbacks", "evaluated", "phases", "group_accuracy", "personal_mean_accuracy", "personal_accuracy_std", "personal_worst_accuracy", "personal_group_accuracy", "cluster_accuracy", "personal_cluster_accuracy", "rejected_by", "rolled_back", "rollback_reason", "refused_evaluations", "diverged_evaluations", "convicted", "merge_refused", "failed_clusters", "epsilon", "dp_noise", "dp_rate", "dp_clip", "dp_sigma", "dp_clipped", "finished_at", "evaluated_version", "staleness_mean", "staleness_max", "stale")
    class ClusterWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class PhasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class GroupAccuracyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class PersonalGroupAccuracyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class ClusterAccuracyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class PersonalClusterAccuracyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class RejectedByEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FailedClustersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_STD_FIELD_NUMBER: _ClassVar[int]
    WORST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORST_DECILE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    GROUP_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_MEAN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_ACCURACY_STD_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_WORST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_GROUP_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_CLUSTER_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    REFUSED_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    DIVERGED_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    CONVICTED_FIELD_NUMBER: _ClassVar[int]
    MERGE_REFUSED_FIELD_NUMBER: _ClassVar[int]
    FAILED_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_FIELD_NUMBER: _ClassVar[int]
    DP_RATE_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_FIELD_NUMBER: _ClassVar[int]
    DP_SIGMA_FIELD_NUMBER: _ClassVar[int]
    DP_CLIPPED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MEAN_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MAX_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    round: int
    mean_accuracy: float
    mean_loss: float
    accuracy_std: float
    worst_accuracy: float
    duration_s: float
    rejected: int
    selected: int
    received: int
    timed_out: int
    model_version: int
    worst_decile_accuracy: float
    cluster_weights: _containers.ScalarMap[int, float]
    rejected_clusters: int
    fallbacks: int
    evaluated: int
    phases: _containers.ScalarMap[str, float]
    group_accuracy: _containers.ScalarMap[int, float]
    personal_mean_accuracy: float
    personal_accuracy_std: float
    personal_worst_accuracy: float
    personal_group_accuracy: _containers.ScalarMap[int, float]
    cluster_accuracy: _containers.ScalarMap[int, float]
    personal_cluster_accuracy: _containers.ScalarMap[int, float]
    rejected_by: _containers.ScalarMap[str, int]
    rolled_back: bool
    rollback_reason: str
    refused_evaluations: int
    diverged_evaluations: int
    convicted: _containers.RepeatedScalarFieldContainer[str]
    merge_refused: str
    failed_clusters: _containers.ScalarMap[int, int]
    epsilon: float
    dp_noise: float
    dp_rate: float
    dp_clip: float
    dp_sigma: float
    dp_clipped: int
    finished_at: float
    evaluated_version: int
    staleness_mean: float
    staleness_max: int
    stale: int
    def __init__(self, round: _Optional[int] = ..., mean_accuracy: _Optional[float] = ..., mean_loss: _Optional[float] = ..., accuracy_std: _Optional[float] = ..., worst_accuracy: _Optional[float] = ..., duration_s: _Optional[float] = ..., rejected: _Optional[int] = ..., selected: _Optional[int] = ..., received: _Optional[int] = ..., timed_out: _Optional[int] = ..., model_version: _Optional[int] = ..., worst_decile_accuracy: _Optional[float] = ..., cluster_weights: _Optional[_Mapping[int, float]] = ..., rejected_clusters: _Optional[int] = ..., fallbacks: _Optional[int] = ..., evaluated: _Optional[int] = ..., phases: _Optional[_Mapping[str, float]] = ..., group_accuracy: _Optional[_Mapping[int, float]] = ..., personal_mean_accuracy: _Optional[float] = ..., personal_accuracy_std: _Optional[float] = ..., personal_worst_accuracy: _Optional[float] = ..., personal_group_accuracy: _Optional[_Mapping[int, float]] = ..., cluster_accuracy: _Optional[_Mapping[int, float]] = ..., personal_cluster_accuracy: _Optional[_Mapping[int, float]] = ..., rejected_by: _Optional[_Mapping[str, int]] = ..., rolled_back: _Optional[bool] = ..., rollback_reason: _Optional[str] = ..., refused_evaluations: _Optional[int] = ..., diverged_evaluations: _Optional[int] = ..., convicted: _Optional[_Iterable[str]] = ..., merge_refused: _Optional[str] = ..., failed_clusters: _Optional[_Mapping[int, int]] = ..., epsilon: _Optional[float] = ..., dp_noise: _Optional[float] = ..., dp_rate: _Optional[float] = ..., dp_clip: _Optional[float] = ..., dp_sigma: _Optional[float] = ..., dp_clipped: _Optional[int] = ..., finished_at: _Optional[float] = ..., evaluated_version: _Optional[int] = ..., staleness_mean: _Optional[float] = ..., staleness_max: _Optional[int] = ..., stale: _Optional[int] = ...) -> None: ...

class ParticipantCluster(_message.Message):
    __slots__ = ("participant_id", "cluster", "group")
    PARTICIPANT_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    participant_id: str
    cluster: int
    group: int
    def __init__(self, participant_id: _Optional[str] = ..., cluster: _Optional[int] = ..., group: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("phase", "round", "rounds", "participants", "model_version", "history", "clusters", "purity", "done", "strategy", "error", "members_total", "history_total", "stopped", "version", "revision")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    PURITY_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    phase: str
    round: int
    rounds: int
    participants: int
    model_version: int
    history: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    clusters: _containers.RepeatedCompositeFieldContainer[ParticipantCluster]
    purity: float
    done: bool
    strategy: str
    error: str
    members_total: int
    history_total: int
    stopped: str
    version: str
    revision: str
    def __init__(self, phase: _Optional[str] = ..., round: _Optional[int] = ..., rounds: _Optional[int] = ..., participants: _Optional[int] = ..., model_version: _Optional[int] = ..., history: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ..., clusters: _Optional[_Iterable[_Union[ParticipantCluster, _Mapping]]] = ..., purity: _Optional[float] = ..., done: _Optional[bool] = ..., strategy: _Optional[str] = ..., error: _Optional[str] = ..., members_total: _Optional[int] = ..., history_total: _Optional[int] = ..., stopped: _Optional[str] = ..., version: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...
